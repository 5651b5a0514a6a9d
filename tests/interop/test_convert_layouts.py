"""Conversion against transformers as the reference: tiny random models of every supported
architecture, loaded at several parallel layouts; round trips; resharding; export."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.convert_workers import logits_worker
from tests.helpers.workers import spawn

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
PESC = dict(num_experts=4, topk=2, adapter_dim=8, adapter_scaling=0.5)


def make_hf(kind: str, folder):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    elif kind == "llama3_tied":  # Llama 3.1-style RoPE scaling, tied embeddings (SmolLM-like)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, "max_position_embeddings": 16384},
                                             tie_word_embeddings=True, rope_theta=500000.0,
                                             rope_scaling=dict(rope_type="llama3", factor=8.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192)))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=None))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))
    with torch.no_grad():  # norms and biases away from their trivial init
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    # Sharded safetensors for Llama, sharded PyTorch .bin for Qwen2, single files otherwise.
    model.save_pretrained(folder, max_shard_size="40KB" if kind in ("llama", "qwen2") else "1GB")
    if kind == "qwen2":  # transformers 5 only writes safetensors: rewrite the shards as .bin
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        for f in sorted(set(index["weight_map"].values())):
            torch.save(load_file(folder / f), folder / f.replace("model", "pytorch_model")
                       .replace(".safetensors", ".bin"))
            (folder / f).unlink()
        index["weight_map"] = {k: v.replace("model", "pytorch_model").replace(
            ".safetensors", ".bin") for k, v in index["weight_map"].items()}
        (folder / "model.safetensors.index.json").unlink()
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, single_rank):
    """{kind: (hf_folder, pesc_ckpt, tokens_path, reference_logits)}."""
    from pesc_megatron.interop.hf_to_pesc import convert

    root = tmp_path_factory.mktemp("convert")
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator()
                           .manual_seed(5))
    torch.save(tokens, root / "tokens.pt")
    out = {}
    for kind in ("llama", "llama3_tied", "mistral", "qwen2"):
        model = make_hf(kind, root / f"hf_{kind}")
        with torch.no_grad():
            ref = model(tokens).logits
        convert(root / f"hf_{kind}", root / f"pesc_{kind}", PESC, dtype="fp32")
        out[kind] = (root / f"hf_{kind}", root / f"pesc_{kind}", root / "tokens.pt", ref)
    return root, out


def close(got, want, rel=1e-4):
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= rel, f"max relative error {err:.2e}"


LAYOUTS = {"tp1": (1, {}), "tp2": (2, dict(tp=2)), "ep2": (2, dict(ep=2))}


@pytest.mark.parametrize("kind", ["llama", "llama3_tied", "mistral", "qwen2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers(converted, kind, layout):
    root, models = converted
    _, ckpt, tokens, ref = models[kind]
    world, par = LAYOUTS[layout]
    out = root / f"logits_{kind}_{layout}.pt"
    spawn(logits_worker, world, str(ckpt), par, str(tokens), str(out))
    close(torch.load(out), ref)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_to_pesc_to_hf_is_bit_exact(converted, kind, tmp_path):
    from pesc_megatron.interop.pesc_to_hf import export

    hf, ckpt, _, _ = converted[1][kind]
    original = {}
    if kind == "qwen2":
        for f in hf.glob("pytorch_model*.bin"):
            original.update(torch.load(f, weights_only=True))
    else:
        for f in hf.glob("*.safetensors"):
            original.update(load_file(f))
    for fmt in ("dense", "camelidae"):
        export(ckpt, tmp_path / fmt, fmt=fmt, max_shard_gb=30e3 / 2**30)  # ~30 KB shards
        assert len(list((tmp_path / fmt).glob("model-*-of-*.safetensors"))) > 1
        got = {}
        for f in (tmp_path / fmt).glob("*.safetensors"):
            got.update(load_file(f))
        for name, want in original.items():
            assert torch.equal(got[name], want), (fmt, name)
        extra = sorted(set(got) - set(original))
        if fmt == "dense":
            assert extra == []
        else:
            assert extra and all(".mlp.moe_adapter." in n for n in extra), extra
    index = json.loads((tmp_path / "camelidae" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert cfg["architectures"] == json.loads((hf / "config.json").read_text())["architectures"]


def test_adapters_reshard_export_and_round_trip(converted, tmp_path):
    """Non-zero adapters: saved at EP=2, loaded at TP=2 (same logits); exported to the
    Camelidae layout, transformers gives the same logits; importing that export gives back
    every router and adapter tensor bit for bit."""
    from megatron.core.dist_checkpointing import load_plain_tensors
    from transformers import AutoModelForCausalLM

    from pesc_megatron.interop.hf_to_pesc import convert
    from pesc_megatron.interop.pesc_to_hf import export

    root, models = converted
    _, ckpt, tokens, _ = models["llama"]
    tuned = tmp_path / "tuned"
    spawn(logits_worker, 2, str(ckpt), dict(ep=2), str(tokens), str(tmp_path / "ep2.pt"),
          True, str(tuned))
    spawn(logits_worker, 2, str(tuned), dict(tp=2), str(tokens), str(tmp_path / "tp2.pt"))
    at_ep2, at_tp2 = torch.load(tmp_path / "ep2.pt"), torch.load(tmp_path / "tp2.pt")
    close(at_tp2, at_ep2, rel=1e-5)

    export(tuned, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        close(hf(torch.load(tokens)).logits, at_ep2)

    convert(tmp_path / "hf", tmp_path / "back", None, dtype="fp32")
    a = load_plain_tensors(str(tuned / "weights"))
    b = load_plain_tensors(str(tmp_path / "back" / "weights"))
    keys = [k for k in a if ".router." in k or ".experts." in k]
    assert len(keys) == 3
    for k in keys:
        assert torch.equal(a[k], b[k]), k
