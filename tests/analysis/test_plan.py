"""`pesc plan`: its formulas against independent counts (size.py, what autograd keeps for
backward in a built model) and the command's verdicts and errors."""
import json

import pytest
import torch

from pesc_megatron.analysis.plan import (
    Job,
    Layout,
    frozen_bytes,
    stage_activations,
    trainable_counts,
)
from pesc_megatron.cli import main
from pesc_megatron.model.config import LORA_TARGETS, LoRAConfig, ModelConfig, PESCConfig
from pesc_megatron.model.size import PRESETS, count_parameters
from pesc_megatron.parallel.config import ParallelConfig


@pytest.mark.parametrize("preset", list(PRESETS))
def test_counts_on_one_gpu_equal_the_model_sizes(preset):
    model, pesc, lora = PRESETS[preset], PESCConfig(), LoRAConfig(list(LORA_TARGETS), rank=64)
    job = Job(model, pesc, lora, dtype="bf16")
    counts = count_parameters(model, pesc, lora)
    assert frozen_bytes(job, Layout(), stage=0) == 2 * counts["dense"]
    assert trainable_counts(job, Layout()) == {k: counts[k] for k in
                                               ("routers", "adapters", "lora")}
    # TP4 x PP2 x EP8: the frozen linears split by 4 over the stages, experts by 8.
    lay = Layout(tp=4, pp=2, ep=8, world=64)
    split = trainable_counts(job, lay)
    assert split["adapters"] * 8 * 2 == counts["adapters"]
    assert split["routers"] * 2 == counts["routers"]


def _saved_bytes(model, tokens, mask, position_ids=None, **kwargs) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, position_ids, mask, **kwargs)  # logits: no loss, so nothing of it kept
    return sum(saved.values())


@pytest.mark.parametrize("attention", ["sdpa", "local"])
@pytest.mark.parametrize("kv_heads,lora,recompute", [
    (2, False, "none"),  # GQA: k and v repeated to every head
    (4, True, "none"),  # no GQA: v keeps the fused qkv output alive; LoRA on all seven
    (2, True, "selective"),
    (2, True, "full"),
    (4, False, "selective"),
    (2, "no dropout", "none"),  # LoRA's inputs kept once, as without dropout they are read
])
def test_saved_activations_match_what_autograd_keeps(single_rank, kv_heads, lora, recompute,
                                                     attention):
    from pesc_megatron.model.builder import build_model

    model_cfg = ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=kv_heads,
                            vocab_size=128, max_position_embeddings=64)
    pesc = PESCConfig(num_experts=4, topk=2, adapter_dim=16, adapter_dropout=0.1)
    lora_cfg = LoRAConfig(list(LORA_TARGETS), rank=8, dropout=0.0 if lora == "no dropout"
                          else 0.1) if lora else LoRAConfig()
    job = Job(model_cfg, pesc, lora_cfg, seq=64, micro_batch=2, dtype="fp32",
              recompute=recompute, attention=attention, packed=False)
    model = build_model(model_cfg, pesc, ParallelConfig(), lora=lora_cfg, recompute=recompute,
                        attention=attention)
    model.train()  # dropout masks are kept too
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    # The local attention with the mask of packed sequences (here causal); the fused one causal.
    mask = torch.ones(64, 64, dtype=torch.bool).triu(1).expand(2, 1, 64, 64).contiguous() \
        if attention == "local" else None
    predicted = stage_activations(job, Layout(), stage=0)["saved"]
    # Not exact: small bookkeeping tensors (norm statistics, routing indices) are estimates.
    assert _saved_bytes(model, tokens, mask) == pytest.approx(predicted, rel=0.01)


def test_saved_activations_of_a_packed_batch_with_lora(single_rank):
    """Packed (THD) micro-batches, as `pesc train` runs them, with the fused attention and
    LoRA on all seven projections: o_proj's input is the samples' outputs concatenated, a
    tensor the attention itself does not keep."""
    from pesc_megatron.data import collate
    from pesc_megatron.model.builder import build_model
    from pesc_megatron.train.step import model_inputs

    model_cfg = ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                            max_position_embeddings=64)
    pesc = PESCConfig(num_experts=4, topk=2, adapter_dim=16, adapter_dropout=0.1)
    lora_cfg = LoRAConfig(list(LORA_TARGETS), rank=8)
    job = Job(model_cfg, pesc, lora_cfg, seq=64, micro_batch=2, dtype="fp32")
    model = build_model(model_cfg, pesc, ParallelConfig(), lora=lora_cfg).train()
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    bounds = torch.tensor([0, 32, 48, 64], dtype=torch.int32)
    items = [dict(tokens=tokens[i], labels=tokens[i], loss_mask=torch.ones(64),
                  position_ids=torch.cat([torch.arange(n) for n in bounds.diff().tolist()]),
                  cu_seqlens=bounds) for i in range(2)]
    data = model_inputs(collate(items))
    saved = _saved_bytes(model, data["tokens"], data["attention_mask"], data["position_ids"],
                         packed_seq_params=data["packed_seq_params"])
    predicted = stage_activations(job, Layout(), stage=0)["saved"]
    assert saved == pytest.approx(predicted, rel=0.01)


def _plan(capsys, *args):
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, (json.loads(out.out.strip().splitlines()[-1]) if code == 0 else None), \
        out.err


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_the_34b_paper_setting_gets_a_layout_that_fits(capsys, nodes):
    code, text, row, _ = _plan(capsys, "--model", "yi-34b", "--nodes", str(nodes),
                               "--seq", "512", "--micro-batch", "4")
    assert code == 0 and row["suggested"] and row["fits_with_headroom"]
    assert (row["num_experts"], row["adapter_dim"], row["lora_rank"]) == (8, 512, 64)
    assert row["per_gpu_gib"]["total"] <= 0.9 * 80
    assert "suggested layout: TP" in text


def test_a_fixed_layout_gets_a_verdict(capsys):
    # Yi-34B unsplit: its bf16 base alone is 64 GiB.
    code, text, row, _ = _plan(capsys, "--model", "yi-34b", "--tp", "1", "--pp", "1", "--ep",
                               "1", "--seq", "512")
    assert code == 0 and not row["fits"] and not row["suggested"]
    assert "does NOT fit" in text and row["per_gpu_gib"]["frozen"] > 60
    code, text, row, _ = _plan(capsys, "--model", "llama2-7b", "--tp", "1", "--pp", "1",
                               "--ep", "1", "--seq", "512", "--micro-batch", "4")
    assert code == 0 and row["fits"] and row["layout"]["dp"] == 8


def test_nothing_fits_is_a_verdict(capsys):
    code, text, row, _ = _plan(capsys, "--model", "llama2-13b", "--gpus-per-node", "1",
                               "--gpu-memory", "16")
    assert code == 0 and "nothing fits" in text
    assert not row["fits"] and not row["fits_with_headroom"]


def test_low_precision_bases_and_options(capsys):
    *_, bf16 = _plan(capsys, "--model", "llama2-7b", "--tp", "1", "--pp", "1", "--ep", "1")[:3]
    code, text, fp8, _ = _plan(capsys, "--model", "llama2-7b", "--tp", "1", "--pp", "1",
                               "--ep", "1", "--frozen-weights", "fp8")
    assert code == 0 and "projection" in text and "frozen base, FP8" in text
    assert fp8["per_gpu_gib"]["frozen"] < 0.6 * bf16["per_gpu_gib"]["frozen"]
    code, text, nf4, _ = _plan(capsys, "--model", "llama2-7b", "--tp", "1", "--pp", "1",
                               "--ep", "1", "--frozen-weights", "nf4")
    assert code == 0 and "frozen base, NF4" in text and nf4["frozen_weights"] == "nf4"
    # 4.13 bits per weight; the norms stay bf16
    assert 0.25 * bf16["per_gpu_gib"]["frozen"] < nf4["per_gpu_gib"]["frozen"] < \
        0.27 * bf16["per_gpu_gib"]["frozen"]
    *_, no_lora = _plan(capsys, "--model", "llama2-7b", "--tp", "1", "--pp", "1", "--ep", "1",
                        "--lora-rank", "0")[:3]
    assert no_lora["lora_rank"] == 0
    assert no_lora["per_gpu_gib"]["trainable"] < bf16["per_gpu_gib"]["trainable"]


def test_a_hugging_face_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
        intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512, hidden_act="silu")))
    code, _, row, _ = _plan(capsys, "--model", str(tmp_path), "--gpus-per-node", "2",
                            "--num-experts", "4", "--adapter-dim", "64", "--seq", "512")
    assert code == 0 and row["fits"] and (row["num_experts"], row["adapter_dim"]) == (4, 64)
    assert row["layout"] == dict(tp=1, pp=1, ep=1, etp=1, dp=2, expert_dp=2)


@pytest.mark.parametrize("args,message", [
    (["--model", "llama9-1t"], "llama9-1t: neither a preset"),
    (["--model", "llama2-7b", "--tp", "3"], "parallel.tp=3 does not divide"),
    (["--model", "llama2-7b", "--ep", "3"], "parallel.ep=3 does not divide pesc.num_experts=8"),
    (["--model", "llama2-7b", "--tp", "2", "--seq", "4095"], "--seq 4095 is not divisible"),
    (["--model", "llama2-7b", "--lora-rank", "9000"], "lora.rank=9000: larger than"),
    (["--model", "llama2-7b", "--nodes", "0"], "--nodes=0: must be >= 1"),
    (["--model", "llama2-7b", "--tp", "0"], "parallel.tp=0: must be >= 1"),
    (["--model", "llama2-7b", "--topk", "9"], "pesc.topk=9: must be between 1 and"),
])
def test_user_errors_are_one_line(capsys, args, message):
    code, _, _, err = _plan(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
