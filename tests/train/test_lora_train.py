"""The paper's full recipe on a tiny real job: `pesc train` with LoRA on all seven projections
at TP=2 (sequence parallel), then export. The merged export in transformers, and the unmerged
export with PEFT's own LoRA (PeftModel), give the megatron-core model's logits (LoRA unmerged)."""
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import tiny
from tests.helpers.tiny import ENV, ROOT, history, train

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

LORA = {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj"], "rank": 8, "alpha": 16.0, "dropout": 0.1}


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_rank):
    root = tmp_path_factory.mktemp("lora")
    _, config = tiny.make_job(root, 64, lora=LORA, parallel={"tp": 2}, train={"iters": 6})
    train(2, config)
    return root, config


def megatron_logits(ckpt, tokens):
    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.parallel.config import ParallelConfig

    model, info = checkpoint.load(ckpt, ParallelConfig())
    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    return logits, model, info


def close(got, want, rel=1e-4):
    err = (got - want).abs().max().item() / want.abs().max().item()
    print(f"max relative error {err:.2e}")
    assert err <= rel, f"max relative error {err:.2e}"


def test_lora_trains_and_exports_merged(run, tmp_path):
    from transformers import AutoModelForCausalLM

    from pesc_megatron.interop.pesc_to_hf import export

    root, _ = run
    rows = history(root / "run")
    assert rows[6]["lm_loss"] < rows[1]["lm_loss"]
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    want, model, info = megatron_logits(root / "run", tokens)
    assert info.lora.targets == LORA["targets"] and info.lora.rank == 8
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(torch.count_nonzero(p) > 0 for p in lora_b)  # trained

    out = export(root / "run", tmp_path / "merged")
    assert not (out / "lora").exists()
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        close(hf(tokens).logits, want)
    # The merge changed the base weights (against the base's own export).
    base = AutoModelForCausalLM.from_pretrained(
        export(root / "base", tmp_path / "base"), trust_remote_code=True)
    assert not torch.equal(hf.model.layers[0].self_attn.q_proj.weight,
                           base.model.layers[0].self_attn.q_proj.weight)


def test_unmerged_export_is_a_peft_adapter(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pesc_megatron.interop.pesc_to_hf import export

    root, _ = run
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    want, _, _ = megatron_logits(root / "run", tokens)
    out = export(root / "run", tmp_path / "unmerged", merge=False)
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        without = hf(tokens).logits
    assert (without - want).abs().max() > 1e-3  # the base alone is not the tuned model
    peft = PeftModel.from_pretrained(hf, out / "lora").eval()
    assert sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n) == sum(
        p.numel() for n, p in megatron_logits(root / "run", tokens)[1].named_parameters()
        if ".lora." in n)
    with torch.no_grad():
        close(peft(tokens).logits, want)


def test_resume_with_other_lora_is_refused(run):
    _, config = run
    proc = subprocess.run([sys.executable, "-m", "pesc_megatron.cli", "train", str(config),
                           "lora.rank=4", "parallel.tp=1"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lora:" in last and "'rank': 8" in last and "'rank': 4" in last
