"""Parameter counts from settings (`pesc info`) against built models and known model sizes."""
import json

import pytest

from pesc_megatron.cli import main
from pesc_megatron.model.config import LoRAConfig, ModelConfig, PESCConfig
from pesc_megatron.model.size import count_parameters
from pesc_megatron.parallel.config import ParallelConfig


@pytest.mark.parametrize("model,lora", [
    (dict(), ["q_proj", "v_proj", "down_proj"]),
    (dict(tie_word_embeddings=True, attention_bias=True), ["k_proj", "o_proj", "gate_proj",
                                                           "up_proj"]),
    (dict(), []),
])
def test_counts_match_a_built_model(single_rank, model, lora):
    from pesc_megatron.model.builder import build_model

    m = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **model)
    p = PESCConfig(num_experts=4, adapter_dim=8)
    lo = LoRAConfig(targets=lora, rank=4)
    built = build_model(m, p, ParallelConfig(), lora=lo)
    got = dict(dense=0, routers=0, adapters=0, lora=0)
    for name, param in built.named_parameters():
        part = ("routers" if ".router." in name else "adapters" if ".experts." in name
                else "lora" if ".lora." in name else "dense")
        got[part] += param.numel()
        assert param.requires_grad == (part != "dense"), name
    counts = count_parameters(m, p, lo)
    assert {k: counts[k] for k in got} == got
    assert counts["trainable"] == got["routers"] + got["adapters"] + got["lora"]


def test_info_of_the_paper_7b_setting(capsys):
    assert main(["info", "llama2-7b", "--lora-rank", "64"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    row = json.loads(out[-1])
    assert row["dense"] == 6_738_415_616  # Llama-2-7B's published parameter count
    assert row["lora"] == 32 * 64 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert row["adapters"] == 32 * 8 * 2 * 4096 * 512
    assert any(line.startswith("trainable") and "1,234,698,240" in line for line in out)


def test_info_of_a_checkpoint_and_errors(capsys, tmp_path, single_rank):
    from tests.helpers import tiny

    ckpt = tiny.make_checkpoint(tmp_path, layers=1)
    assert main(["info", str(ckpt)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["num_experts"], row["lora"]) == (tiny.PESC["num_experts"], 0)
    assert main(["info", str(tmp_path / "hf"), "--lora-rank", "4"]) == 0  # the source HF folder
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lora"] > 0
    assert main(["info", "llama2-7b", "--lora-rank", "5000"]) == 2
    assert "lora.rank=5000: larger than q_proj" in capsys.readouterr().err
    assert main(["info", "llama9-1t"]) == 2
    assert "llama9-1t: neither a preset" in capsys.readouterr().err


@pytest.mark.parametrize("frozen,dtype", [("nf4", "fp32"), ("fp8", "fp32"), (None, "fp32")])
def test_frozen_bytes_equal_the_loaded_model(capsys, tmp_path, single_rank, frozen, dtype):
    """`pesc info --frozen-weights` against the checkpoint loaded and converted by the loader
    (the output layer's 32 high-precision columns included)."""
    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.model.precision import PrecisionConfig
    from pesc_megatron.model.quantized import frozen_weight_bytes
    from tests.helpers import tiny

    ckpt = tiny.make_checkpoint(tmp_path, layers=2)
    flags = ["--frozen-weights", frozen] if frozen else []
    assert main(["info", str(ckpt), "--dtype", dtype, *flags]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, _ = checkpoint.load(ckpt, ParallelConfig(), dtype,
                               precision=PrecisionConfig(frozen_weights=frozen))
    assert row["frozen_bytes"] == frozen_weight_bytes(model)["bytes"]
