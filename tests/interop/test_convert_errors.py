"""Bad conversion input: one error line naming the problem, exit code 2, nothing written."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("errors") / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(folder, max_shard_size="40KB")
    return folder


def pesc(*args):
    return subprocess.run([sys.executable, "-m", "pesc_megatron.cli", "convert", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def assert_fails(run, *fragments):
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("pesc convert: error: ")
    for fragment in fragments:
        assert fragment in last, last


def copy(hf, tmp_path):
    return shutil.copytree(hf, tmp_path / "hf")


@pytest.mark.multiprocess
def test_missing_shard(hf, tmp_path):
    src = copy(hf, tmp_path)
    (src / "model-00002-of-00003.safetensors").unlink()
    run = pesc("hf-to-pesc", "--hf", src, "--out", tmp_path / "out")
    assert_fails(run, "model-00002-of-00003.safetensors: shard listed in the index is missing")
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_truncated_shard(hf, tmp_path):
    src = copy(hf, tmp_path)
    shard = src / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    run = pesc("hf-to-pesc", "--hf", src, "--out", tmp_path / "out")
    assert_fails(run, "model-00003-of-00003.safetensors", "truncated or corrupt")
    assert not list(tmp_path.glob("out*"))


@pytest.mark.multiprocess
def test_unsupported_architecture(hf, tmp_path):
    src = copy(hf, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (src / "config.json").write_text(json.dumps(cfg))
    run = pesc("hf-to-pesc", "--hf", src, "--out", tmp_path / "out")
    assert_fails(run, "architecture 'GPT2LMHeadModel'", "is not supported")


@pytest.mark.multiprocess
def test_existing_out_is_refused_unless_forced(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_fails(pesc("hf-to-pesc", "--hf", hf, "--out", out), f"--out {out} exists",
                 "--force")
    assert (out / "keep.txt").read_text() == "mine"
    run = pesc("hf-to-pesc", "--hf", hf, "--out", out, "--force", "--num-experts", "4",
               "--adapter-dim", "8")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "pesc.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial / .old left


@pytest.mark.multiprocess
def test_out_must_not_be_the_input(hf, tmp_path):
    src = copy(hf, tmp_path)
    assert_fails(pesc("hf-to-pesc", "--hf", src, "--out", src, "--force"), "is the input itself")
    assert (src / "config.json").is_file()


@pytest.mark.multiprocess
def test_camelidae_adapter_shapes_must_match_config(hf, tmp_path, single_rank):
    from pesc_megatron.interop.hf_to_pesc import convert
    from pesc_megatron.interop.pesc_to_hf import export

    ckpt, exported = tmp_path / "ckpt", tmp_path / "camelidae"
    convert(hf, ckpt, dict(num_experts=4, adapter_dim=8), dtype="fp32")
    export(ckpt, exported)
    cfg = json.loads((exported / "config.json").read_text())
    cfg["adapter_dim"] = 16
    (exported / "config.json").write_text(json.dumps(cfg))
    run = pesc("hf-to-pesc", "--hf", exported, "--out", tmp_path / "again")
    assert_fails(run, "expert_0.adapter_down.weight [8, 32]", "[16, 32]")


def test_tp_must_divide_heads_at_load_time(hf, tmp_path, single_rank):
    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.interop.hf_to_pesc import convert
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.schema import ConfigError

    convert(hf, tmp_path / "ckpt", dict(num_experts=4, adapter_dim=8), dtype="fp32")
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide "
                       "model.num_attention_heads=4"):
        checkpoint.load(tmp_path / "ckpt", ParallelConfig(tp=3))
