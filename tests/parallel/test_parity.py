"""Every parallel layout gives the single-rank loss and gradients (fp32, gloo on CPU)."""
import pytest
import torch

from tests.helpers.workers import check_layout, parity_worker, spawn

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

LAYOUTS = {
    "tp2_sp": (2, dict(tp=2)),
    "ep2_allgather": (2, dict(ep=2, dispatcher="allgather")),
    "ep2_alltoall": (2, dict(ep=2, dispatcher="alltoall")),
    "tp2_ep2": (4, dict(tp=2, ep=2)),
    "pp2": (2, dict(pp=2)),
    "dp2": (2, dict()),
}


# LoRA on all seven projections (routers, adapters and LoRA A/B all non-zero).
LORA_LAYOUTS = {
    "lora_tp2_sp": (2, dict(tp=2, lora=True)),
    "lora_pp2": (2, dict(pp=2, lora=True)),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    spawn(parity_worker, 1, {}, str(root / "ckpt"), str(root / "ref.pt"))
    return root, torch.load(root / "ref.pt")


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_lora")
    spawn(parity_worker, 1, {"lora": True}, str(root / "ckpt"), str(root / "ref.pt"))
    return root, torch.load(root / "ref.pt")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(reference, name):
    check_layout(reference, *LAYOUTS[name], name)


@pytest.mark.parametrize("name", list(LORA_LAYOUTS))
def test_lora_layout_matches_single_rank(lora_reference, name):
    check_layout(lora_reference, *LORA_LAYOUTS[name], name)
