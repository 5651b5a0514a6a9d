"""Data: formats and their loss masks token by token, policies, packing, the token cache, and
both tokenizer kinds (SmolLM2's HF tokenizer and a sentencepiece model trained here)."""
import json
import shutil

import numpy as np
import pytest
import torch

from pesc_megatron.data import (
    DataError,
    SentencePieceTokenizer,
    build_dataset,
    collate,
    first_fit,
    load_tokenizer,
    render_record,
    to_training_example,
)

from tests.conftest import needs_smollm2
from tests.data.conftest import write_jsonl


def targets(ids, mask):
    return [i for i, m in zip(ids, mask) if m]


# --- formats -------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 4? Say 'Sure thing.'"},
        {"role": "assistant", "content": "Sure thing. 8"}]


@needs_smollm2
@pytest.mark.parametrize("messages", [CHAT, CHAT[1:]], ids=["system", "default-system"])
def test_chat_mask_smollm2(hf, messages):
    ids, mask = render_record({"messages": messages}, hf)
    # The pieces concatenate to the whole conversation rendered at once.
    text = hf.tok.apply_chat_template(messages, tokenize=False)
    assert ids == hf.encode(text)
    # Independent expectation, from character offsets: targets are exactly the characters from
    # after each "<|im_start|>assistant\n" up to and including the next "<|im_end|>".
    spans, pos = [], 0
    while (pos := text.find("<|im_start|>assistant\n", pos)) >= 0:
        start = pos + len("<|im_start|>assistant\n")
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        spans.append((start, end))
        pos = end
    assert len(spans) == 2
    offsets = hf.tok(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    expected = [int(any(a <= s and e <= b for a, b in spans)) for s, e in offsets]
    assert mask == expected
    assert hf.decode(targets(ids, mask)) == "4<|im_end|>Sure thing. 8<|im_end|>"
    assert targets(ids, mask).count(hf.eos_id) == 2  # each turn's <|im_end|> is a target


@needs_smollm2
def test_chat_template_failure_is_a_data_error(hf):
    with pytest.raises(DataError, match="^f.jsonl:3: chat template failed") as e:
        render_record({"messages": [{"role": "assistant", "content": "hi"}]}, hf, "f.jsonl:3")
    assert e.value.kind == "chat template"


def test_chat_builtin_template_sentencepiece(sp):
    assert isinstance(sp, SentencePieceTokenizer) and not sp.has_chat_template
    ids, mask = render_record({"messages": CHAT}, sp)
    e, B, E = sp.encode, sp.bos_id, sp.eos_id
    pieces = [([B], 0)]
    for m in CHAT:
        pieces += [(e(f"<|im_start|>{m['role']}\n"), 0),
                   (e(m["content"]) + [E], int(m["role"] == "assistant"))]
    assert ids == [i for p, _ in pieces for i in p]
    assert mask == [t for p, t in pieces for _ in p]
    prompt = sp.chat_segments(CHAT[:2], add_generation_prompt=True)
    assert [i for s, _ in prompt for i in s][-len(e("<|im_start|>assistant\n")):] == \
        e("<|im_start|>assistant\n")


def expected_camelidae(tok, instruction, turns):
    """By hand, from the documented rule: one BOS, system once, each output + EOS a target."""
    ids, mask = [tok.bos_id], [0]
    for t, (inp, out) in enumerate(turns):
        system = f"### System:\n{instruction}\n" if t == 0 and instruction else ""
        prompt = tok.encode(system + f"### Human:\n{inp}\n### Assistant:\n")
        target = tok.encode(out) + [tok.eos_id]
        ids, mask = ids + prompt + target, mask + [0] * len(prompt) + [1] * len(target)
    return ids, mask


@pytest.mark.parametrize("kind", [pytest.param("hf", marks=needs_smollm2), "sp"])
@pytest.mark.parametrize("instruction", ["You are a poet.", ""])
def test_camelidae_all_turns_one_bos(kind, instruction, request):
    tok = request.getfixturevalue(kind)
    turns = [("Write about cats", "Cats nap in the sun."), ("And dogs?", "Dogs run."),
             ("Rivers", "Rivers flow 2 the sea.")]
    record = {"instruction": instruction, "corpus": "x",
              "conversation": [{"input": i, "output": o} for i, o in turns]}
    ids, mask = render_record(record, tok)
    assert (ids, mask) == expected_camelidae(tok, instruction, turns)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert targets(ids, mask).count(tok.eos_id) == 3
    if kind == "hf":  # readable check of the same thing
        assert hf_text(tok, ids, mask) == "".join(f"[{o}<|im_end|>]" for _, o in turns)


def hf_text(tok, ids, mask):
    """Targets as [..] groups, to read the mask."""
    out, prev = "", 0
    for i, m in zip(ids, mask):
        out += ("[" if m and not prev else "]" if prev and not m else "")
        out += tok.decode([i]) if m else ""
        prev = m
    return out + ("]" if prev else "")


@pytest.mark.parametrize("kind", [pytest.param("hf", marks=needs_smollm2), "sp"])
def test_alpaca(kind, request):
    tok = request.getfixturevalue(kind)
    rec = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    assert render_record(rec, tok) == expected_camelidae(tok, "Translate to French.",
                                                        [("cat", "chat")])
    rec = {"instruction": "Name a river.", "input": "", "output": "The Nile."}
    assert render_record(rec, tok) == expected_camelidae(tok, "", [("Name a river.",
                                                                    "The Nile.")])
    del rec["input"]  # a missing input is an empty one
    assert render_record(rec, tok) == expected_camelidae(tok, "", [("Name a river.",
                                                                    "The Nile.")])


@needs_smollm2
def test_plain_text_rule_hf(hf):
    text = "The river flows to the sea."
    ids, mask = render_record({"text": text}, hf)
    assert ids == list(hf.tok(text).input_ids) + [hf.eos_id]  # the rule, literally
    assert ids[0] != hf.bos_id  # SmolLM2's default call adds no BOS
    assert mask == [0] + [1] * (len(ids) - 1)


def test_plain_text_rule_sentencepiece(sp):
    ids, mask = render_record({"text": "cats and dogs"}, sp)
    assert ids == [sp.bos_id] + sp.sp.encode("cats and dogs") + [sp.eos_id]
    assert mask == [0] + [1] * (len(ids) - 1)


def test_to_training_example_shift_pad_truncate():
    ex = to_training_example([5, 6, 7, 8], [0, 0, 1, 1], seq_length=5, pad_id=0)
    assert ex["tokens"].tolist() == [5, 6, 7, 0, 0]
    assert ex["labels"].tolist() == [6, 7, 8, 0, 0]
    assert ex["loss_mask"].tolist() == [0, 1, 1, 0, 0]  # loss_mask[t] goes with labels[t]
    ex = to_training_example([5, 6, 7, 8], [0, 0, 1, 1], seq_length=2)
    assert ex["tokens"].tolist() == [5, 6] and ex["labels"].tolist() == [6, 7]
    assert ex["loss_mask"].tolist() == [0, 1]


@pytest.mark.parametrize("record, reason", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role is 'bot'"),
    ({"messages": [{"role": "user"}]}, "missing key messages[0].content"),
    ({"instruction": "", "conversation": []}, "conversation must be a non-empty list"),
    ({"conversation": [{"input": "a"}]}, "missing key conversation[0].output"),
    ({"conversation": ["a"]}, "conversation[0] is not an object"),
    ({"instruction": 3, "input": "", "output": "x"}, "instruction must be a string, not int"),
    ({"text": None}, "text must be a string"),
    ({"prompt": "x"}, "unknown record format (keys: prompt)"),
    ([1, 2], "record is a JSON list"),
])
def test_malformed_records(sp, record, reason):
    with pytest.raises(DataError) as e:
        render_record(record, sp, "f.jsonl:7")
    assert str(e.value).startswith("f.jsonl:7: ") and reason in str(e.value)


# --- the dataset: errors and policies ---------------------------------------------------------

def test_bad_line_names_file_and_line(sp, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "cats"}\n\n{"text": "dogs"\n{"text": 1}\n')
    with pytest.raises(DataError, match=rf"^{f}:3: invalid JSON"):
        build_dataset([f], sp, seq_length=16)
    ds = build_dataset([f], sp, seq_length=16, on_error="skip")
    assert ds.stats.records == 3 and ds.stats.samples == 1
    assert ds.stats.skipped == {"invalid JSON": 1, "malformed record": 1}
    assert ds.stats.skipped_examples[1] == f"{f}:4: text must be a string, not int"
    a = tmp_path / "d.json"
    a.write_text(json.dumps([{"text": "cats"}, {"txt": "dogs"}], indent=1))
    with pytest.raises(DataError, match=rf"^{a}: record 1: unknown record format"):
        build_dataset([a], sp, seq_length=16)
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match="bin.jsonl:1: not UTF-8"):
        build_dataset([tmp_path / "bin.jsonl"], sp, seq_length=16)
    with pytest.raises(DataError, match="data file not found"):
        build_dataset([tmp_path / "missing.jsonl"], sp, seq_length=16)


def test_empty_targets_counted_and_dropped(sp, tmp_path):
    empty = [{"text": ""}, {"instruction": "x", "input": "y", "output": " "},
             {"messages": [{"role": "user", "content": "hi"}]}]
    f = write_jsonl(tmp_path / "d.jsonl", empty + [{"text": "cats"}])
    ds = build_dataset([f], sp, seq_length=16)
    assert ds.stats.empty_target == 3 and ds.stats.samples == 1 and len(ds) == 1
    with pytest.raises(DataError, match="no sample with a trainable token"):
        build_dataset([write_jsonl(tmp_path / "e.jsonl", empty)], sp, seq_length=16)


def test_overlong_policies(sp, tmp_path):
    long_text = {"text": " ".join(["cats"] * 40)}
    long_prompt = {"instruction": "", "input": " ".join(["dogs"] * 40), "output": "ok"}
    short = {"text": "cats"}
    f = write_jsonl(tmp_path / "d.jsonl", [long_text, long_prompt, short])
    ds = build_dataset([f], sp, seq_length=8)
    assert (ds.stats.truncated, ds.stats.dropped_overlong, ds.stats.samples) == (1, 1, 2)
    ids, _ = render_record(long_text, sp)
    ex = next(ds[i] for i in range(len(ds)) if ds[i]["loss_mask"].sum() == 8)
    assert ex["tokens"].tolist() == ids[:8] and ex["labels"].tolist() == ids[1:9]
    ds = build_dataset([f], sp, seq_length=8, overlong="drop")
    assert (ds.stats.truncated, ds.stats.dropped_overlong, ds.stats.samples) == (0, 2, 1)


def test_weighted_mix_deterministic(sp, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"cats {i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"dogs {i}"} for i in range(10)])
    ds = build_dataset([(a, 2), (b, 0.5)], sp, seq_length=16, seed=3)
    assert ds.stats.samples == 25 and (ds.samples[:, 0] == 0).sum() == 20
    again = build_dataset([(a, 2), (b, 0.5)], sp, seq_length=16, seed=3)
    other = build_dataset([(a, 2), (b, 0.5)], sp, seq_length=16, seed=4)
    assert (ds.samples == again.samples).all() and not (ds.samples == other.samples).all()


# --- packing ---------------------------------------------------------------------------------

def test_first_fit():
    assert first_fit([5, 3, 4, 2, 6, 1], 8) == [[0, 1], [2, 3, 5], [4]]


def mixed_records():
    recs = []
    for i in range(12):
        recs.append({"text": " ".join(["cats", "dogs", "rivers"][j % 3] for j in range(i + 1))})
        recs.append({"instruction": "answer", "conversation": [
            {"input": f"question {i}", "output": "the answer " * (i % 4 + 1)},
            {"input": "more", "output": "numbers"}]})
    return recs


def test_packing_layout_matches_unpacked(sp, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", mixed_records())
    s = 48
    packed = build_dataset([f], sp, seq_length=s, packing=True, seed=1)
    plain = build_dataset([f], sp, seq_length=s, packing=False, seed=1)
    assert (packed.samples == plain.samples).all() and len(packed) < len(plain)
    assert "cu_seqlens" not in plain[0]

    def pieces(ds, i, bounds):
        ex = ds[i]
        return [tuple(tuple(ex[k][a:b].tolist()) for k in ("tokens", "labels", "loss_mask"))
                for a, b in zip(bounds, bounds[1:])]

    got, want = [], []
    for i in range(len(packed)):
        b = packed.sample_boundaries(i)
        ex = packed[i]
        assert b[-1] <= s
        pos = ex["position_ids"].tolist()
        for x, y in zip(b, b[1:]):
            assert pos[x:y] == list(range(y - x))  # restart per sample
        # the samples' boundaries, and the padding tail as a sample of its own
        assert ex["cu_seqlens"].tolist() == b + ([s] if b[-1] < s else [])
        assert all(v.numel() <= s + 1 for v in ex.values())  # no [s, s] mask
        assert ex["loss_mask"][b[-1]:].sum() == 0
        got += pieces(packed, i, b)
    for k in range(len(plain)):
        want += pieces(plain, k, plain.sample_boundaries(k))
    assert sorted(got) == sorted(want)  # each sample (its targets and labels) exactly once
    assert sum(sum(p[2]) for p in got) == packed.stats.target_tokens


def test_packed_batch_at_8192_positions_holds_no_dense_mask(sp, tmp_path):
    """Collation carries sample boundaries: a packed micro-batch of 2 x 8192 positions is O(s)
    bytes on the host (an [s, s] bool mask alone would be 64 MiB per sequence)."""
    recs = [{"text": " ".join(["cats", "dogs", "rivers"][j % 3] for j in range(40 + i % 300))}
            for i in range(400)]
    f = write_jsonl(tmp_path / "long.jsonl", recs)
    s = 8192
    ds = build_dataset([f], sp, seq_length=s, packing=True)
    batch = collate([ds[0], ds[1]])
    assert batch["cu_seqlens"].dim() == 1 and len(batch["cu_seqlens"]) > 3  # several samples
    assert batch["cu_seqlens"][-1] == 2 * s and batch["max_seqlen"] <= s
    nbytes = sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
    assert nbytes < 64 * 2 * s  # a few int64/float32 per position, nothing quadratic
    assert all(v.numel() <= 2 * s + 1 for v in batch.values() if torch.is_tensor(v))


def test_packing_gives_unpacked_outputs(sp, tmp_path):
    """With its sample boundaries and position ids, a packed sequence through a causal
    attention layer (masked by the boundaries) gives each sample the outputs it gets alone."""
    f = write_jsonl(tmp_path / "d.jsonl", mixed_records())
    packed = build_dataset([f], sp, seq_length=48, packing=True, seed=1)
    plain = build_dataset([f], sp, seq_length=48, packing=False, seed=1)
    torch.manual_seed(0)
    emb, pos_emb = torch.randn(sp.vocab_size, 16), torch.randn(48, 16)
    wq, wk, wv = (torch.randn(16, 16) for _ in range(3))

    def layer(ex):
        x = emb[ex["tokens"]] + pos_emb[ex["position_ids"]]
        q, k, v = x @ wq, x @ wk, x @ wv
        allowed = torch.ones(48, 48, dtype=torch.bool).tril()
        if "cu_seqlens" in ex:
            seg = torch.zeros(48, dtype=torch.long)
            for start in ex["cu_seqlens"][1:-1].tolist():
                seg[start:] += 1
            allowed &= seg[:, None] == seg[None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    for i in range(len(packed)):
        out, b = layer(packed[i]), packed.sample_boundaries(i)
        for j, k in enumerate(packed.bins[i]):
            n = b[j + 1] - b[j]
            torch.testing.assert_close(out[b[j]:b[j + 1]], layer(plain[k])[:n])


# --- the token cache ---------------------------------------------------------------------------

def count_calls(tok, monkeypatch):
    calls = []
    for name in ("encode", "encode_default", "chat_segments"):
        fn = getattr(tok, name)
        monkeypatch.setattr(tok, name, lambda *a, fn=fn, **k: calls.append(1) or fn(*a, **k))
    return calls


def test_cache_reused_and_invalidated(sp, tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", mixed_records())
    cache = tmp_path / "cache"
    calls = count_calls(sp, monkeypatch)
    first = build_dataset([f], sp, seq_length=48, packing=True, cache_dir=cache)
    # one store and one plan, no hidden partial folder left
    assert calls and sorted(p.name[:2] for p in cache.iterdir()) == ["d-", "pl"]
    calls.clear()
    barriers = []
    second = build_dataset([f], sp, seq_length=48, packing=True, cache_dir=cache,
                           builder=False, barrier=lambda: barriers.append(1))
    other_len = build_dataset([f], sp, seq_length=32, cache_dir=cache)  # same tokens
    assert not calls and barriers == [1]
    assert np.array_equal(first.samples, second.samples) and first.stats == second.stats
    assert len(other_len) == other_len.stats.samples
    for i in range(len(first)):
        a, b = first[i], second[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
    write_jsonl(f, mixed_records()[:5])  # a changed file is a new key
    third = build_dataset([f], sp, seq_length=48, cache_dir=cache)
    assert calls and third.stats.records == 5 and len(list(cache.glob("d-*/store.json"))) == 2
    with pytest.raises(DataError, match="missing after the barrier"):
        build_dataset([f], sp, seq_length=48, cache_dir=tmp_path / "elsewhere", builder=False)


def test_cache_keeps_skipped_records(sp, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "cats"}\n{"bad": 1}\n')
    ds = build_dataset([f], sp, seq_length=16, cache_dir=tmp_path / "c", on_error="skip")
    assert ds.stats.skipped == {"unknown format": 1}
    with pytest.raises(DataError, match=rf"^{f}:2: unknown record format"):
        build_dataset([f], sp, seq_length=16, cache_dir=tmp_path / "c")


# --- tokenizer loading -------------------------------------------------------------------------

@needs_smollm2
def test_load_tokenizer_kinds(hf, smol_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smol_folder / name).exists():
            shutil.copy(smol_folder / name, ckpt / "tokenizer" / name)
    from_ckpt = load_tokenizer(ckpt)
    assert from_ckpt.kind == "hf" and from_ckpt.identity == hf.identity  # weights not hashed
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (1, 2, 2, 49152)
    assert hf.has_chat_template and hf.encode("Hello world") == [19556, 905]
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope")


def test_conversion_copies_every_file_of_the_tokenizers_identity(tmp_path):
    """hf-to-pesc copies every file the tokenizer's identity reads (added_tokens.json and
    vocab.txt were missing), so the checkpoint's tokenizer is the source's: same identity,
    same token cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pesc_megatron.checkpoint.format import TOKENIZER
    from pesc_megatron.data import load_tokenizer
    from pesc_megatron.interop.hf_to_pesc import convert
    from tests.helpers import tiny

    hf = tmp_path / "hf"
    tiny.make_tokenizer(hf)
    (hf / "added_tokens.json").write_text("{}")
    (hf / "vocab.txt").write_text("a vocabulary file a slow tokenizer would read\n")
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=128,
                                 max_position_embeddings=64)).save_pretrained(hf)
    out = convert(hf, tmp_path / "base", dict(num_experts=2, topk=2, adapter_dim=4),
                  dtype="fp32")
    copied = out / TOKENIZER
    assert (copied / "added_tokens.json").is_file() and (copied / "vocab.txt").is_file()
    assert load_tokenizer(copied).identity == load_tokenizer(hf).identity
