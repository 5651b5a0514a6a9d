"""The real model: SmolLM2-135M-Instruct (9 heads, 3 kv heads, tied embeddings) converted and
run at TP=1 and TP=3 gives transformers' logits; with non-zero adapters, a checkpoint saved
at EP=2 loads at TP=3 with the same logits as at EP=2 (so EP=2 computes what TP=3 does)."""

import pytest
import torch

from tests.conftest import needs_smollm2
from tests.helpers.convert_workers import logits_worker
from tests.helpers.workers import spawn

# Every test here starts processes (torch.multiprocessing).
pytestmark = [needs_smollm2, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, single_rank, smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pesc_megatron.interop.hf_to_pesc import convert

    folder = smollm2_folder
    root = tmp_path_factory.mktemp("smollm2")
    # 12 tokens: with sequence parallelism the length must divide by TP (3).
    tokens = AutoTokenizer.from_pretrained(folder)(
        "The capital of France is Paris, and the capital of Germany is Berlin.",
        return_tensors="pt").input_ids[:, :12]
    assert tokens.shape[1] == 12
    torch.save(tokens, root / "tokens.pt")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(tokens).logits
    del model
    convert(folder, root / "ckpt", dict(num_experts=8, topk=2, adapter_dim=64), dtype="fp32")
    return root, ref


def close(got, want, rel):
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= rel, f"max relative error {err:.2e}"


@pytest.mark.parametrize("world,layout", [(1, {}), (3, dict(tp=3))], ids=["tp1", "tp3"])
def test_smollm2_logits_match_transformers(smollm2, world, layout):
    root, ref = smollm2
    out = root / f"logits_{world}_{sorted(layout.items())}.pt"
    spawn(logits_worker, world, str(root / "ckpt"), layout, str(root / "tokens.pt"), str(out))
    close(torch.load(out), ref, 1e-4)


def test_smollm2_checkpoint_reshards_ep2_to_tp3(smollm2):
    root, _ = smollm2
    spawn(logits_worker, 2, str(root / "ckpt"), dict(ep=2), str(root / "tokens.pt"),
          str(root / "a.pt"), True, str(root / "tuned"))
    spawn(logits_worker, 3, str(root / "tuned"), dict(tp=3), str(root / "tokens.pt"),
          str(root / "b.pt"))
    # Same weights; only fp32 summation order differs (TP=3 splits every matmul) over 30 layers.
    close(torch.load(root / "b.pt"), torch.load(root / "a.pt"), 1e-4)
