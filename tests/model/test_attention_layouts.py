"""The fused attention (model/attention.py) against megatron-core's unfused local attention:
the same loss and trainable gradients, packed and unpacked, at several layouts and recompute
modes (fp32, gloo). The tiny model has GQA (4 heads, 2 KV heads)."""
import pytest
import torch

from tests.helpers.workers import check_layout, parity_worker, spawn

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

CASES = {  # name: (world, layout) with the fused attention
    "packed_1rank": (1, dict(packed=True)),
    "packed_tp2_sp": (2, dict(packed=True, tp=2)),
    "packed_pp2": (2, dict(packed=True, pp=2)),
    "packed_ep2": (2, dict(packed=True, ep=2)),
    "packed_recompute_selective": (1, dict(packed=True, recompute="selective")),
    "packed_recompute_full": (1, dict(packed=True, recompute="full")),
    "unpacked_tp2_sp": (2, dict(tp=2)),
    "unpacked_pp2": (2, dict(pp=2)),
    "unpacked_ep2": (2, dict(ep=2)),
    "unpacked_recompute_selective": (1, dict(recompute="selective")),
}


def _reference(tmp_path_factory, packed: bool):
    """The single-rank run with megatron-core's unfused attention."""
    root = tmp_path_factory.mktemp("attention_packed" if packed else "attention_unpacked")
    spawn(parity_worker, 1, dict(attention="local", packed=packed), str(root / "ckpt"),
          str(root / "ref.pt"))
    return root, torch.load(root / "ref.pt")


@pytest.fixture(scope="module")
def packed_reference(tmp_path_factory):
    return _reference(tmp_path_factory, packed=True)


@pytest.fixture(scope="module")
def unpacked_reference(tmp_path_factory):
    return _reference(tmp_path_factory, packed=False)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_attention_matches_local(request, name):
    world, layout = CASES[name]
    reference = request.getfixturevalue(
        "packed_reference" if layout.get("packed") else "unpacked_reference")
    check_layout(reference, world, dict(layout, attention="sdpa"), name)
