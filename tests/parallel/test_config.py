"""Bad settings fail early with one line that names the key and value."""
import subprocess
import sys

import pytest

from pesc_megatron.model.config import ModelConfig, PESCConfig
from pesc_megatron.parallel.config import ParallelConfig, validate_layout
from pesc_megatron.schema import ConfigError, from_dict

MODEL = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=6, num_key_value_heads=2)


@pytest.mark.parametrize("parallel,pesc,world,message", [
    (dict(tp=4), {}, None, "parallel.tp=4 does not divide model.num_attention_heads=6"),
    (dict(tp=3), {}, None, "parallel.tp=3 does not divide model.num_key_value_heads=2"),
    (dict(pp=3), {}, None, "parallel.pp=3 does not divide model.num_hidden_layers=4"),
    (dict(ep=3), dict(num_experts=8), None, "parallel.ep=3 does not divide pesc.num_experts=8"),
    (dict(tp=2), {}, 3, "world size 3 is not divisible by parallel.tp*parallel.pp=2"),
    (dict(ep=4), {}, 2, "world size 2 is not divisible by parallel.ep*parallel.etp*parallel.pp=4"),
    (dict(tp=2, sequence_parallel=False), {}, None, "needs sequence parallelism"),
    ({}, dict(topk=9, num_experts=8), None, "pesc.topk=9: must be between 1 and num_experts=8"),
    ({}, dict(routing="sigmoid"), None, "pesc.routing='sigmoid'"),
    ({}, dict(topk=1), None, "pesc.topk=1: needs routing=softmax_topk and renormalize=false"),
    (dict(tp=0), {}, None, "parallel.tp=0: must be >= 1"),
])
def test_layout_errors(parallel, pesc, world, message):
    with pytest.raises(ConfigError) as e:
        validate_layout(MODEL, PESCConfig(**pesc), ParallelConfig(**parallel), world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_vocab_must_divide_by_tp():
    model = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        vocab_size=32001)
    with pytest.raises(ConfigError, match="parallel.tp=2 does not divide model.vocab_size=32001"):
        validate_layout(model, PESCConfig(), ParallelConfig(tp=2))


def test_valid_layouts_pass():
    validate_layout(MODEL, PESCConfig(num_experts=8), ParallelConfig(tp=2, pp=2, ep=4), 16)


def test_unknown_and_mistyped_options():
    with pytest.raises(ConfigError, match=r"^pesc\.num_expert: unknown option"):
        from_dict(PESCConfig, {"num_expert": 8}, "pesc.")
    with pytest.raises(ConfigError, match=r"^parallel\.tp: expected int, got '2'"):
        from_dict(ParallelConfig, {"tp": "2"}, "parallel.")
    assert from_dict(PESCConfig, {"adapter_scaling": 1}, "pesc.").adapter_scaling == 1.0


@pytest.mark.multiprocess
def test_cli_reports_bad_layout_in_one_line_before_any_work():
    run = subprocess.run([sys.executable, "-m", "pesc_megatron.cli", "demo", "--experts", "8",
                          "--topk", "9"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "pesc demo: error: pesc.topk=9: must be between 1 and num_experts=8")


@pytest.mark.multiprocess
def test_cli_help():
    run = subprocess.run([sys.executable, "-m", "pesc_megatron.cli", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "demo" in run.stdout and "bench" in run.stdout


@pytest.mark.parametrize("name,preset,world", [("camelidae-8x7b", "llama2-7b", 8),
                                               ("camelidae-8x13b", "llama2-13b", 16),
                                               ("camelidae-8x34b", "yi-34b", 32)])
def test_paper_configs_are_valid_for_their_models(name, preset, world):
    """The paper's job files load, and their layout and LoRA fit the model they are for."""
    from pathlib import Path

    from pesc_megatron.model.config import validate_lora
    from pesc_megatron.model.size import PRESETS
    from pesc_megatron.parallel.config import validate_layout
    from pesc_megatron.train.config import check_batch_layout, load_job

    path = Path(__file__).resolve().parents[2] / "examples" / "configs" / f"{name}.yaml"
    job = load_job(str(path))
    model = PRESETS[preset]
    validate_layout(model, PESCConfig(num_experts=8, topk=2, adapter_dim=512), job.parallel,
                    world)
    validate_lora(job.lora, model)
    assert job.lora.rank == 64 and len(job.lora.targets) == 7
    check_batch_layout(job, world)
