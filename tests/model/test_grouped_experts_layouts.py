"""The grouped-GEMM adapter experts (model/pesc_layer.py, `experts="grouped"`) against
megatron-core's SequentialMLP loop: the same loss and trainable gradients at every layout,
both dispatchers, with capacity dropping and with padding tokens (fp32, gloo, dropout off)."""
import pytest
import torch

from tests.helpers.workers import check_layout, parity_worker, spawn

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

CASES = {  # name: (world, layout) with the grouped experts; the packed batch has padding
    "1rank": (1, dict()),
    "tp2_sp": (2, dict(tp=2)),
    "ep2_alltoall": (2, dict(ep=2)),
    "ep2_allgather": (2, dict(ep=2, dispatcher="allgather")),
    "pp2": (2, dict(pp=2)),
    "capacity_1rank": (1, dict(capacity_factor=0.5)),
    "capacity_ep2": (2, dict(ep=2, capacity_factor=0.5)),
}


def _reference(tmp_path_factory, capacity_factor):
    root = tmp_path_factory.mktemp("grouped")
    layout = dict(experts="sequential", packed=True, capacity_factor=capacity_factor)
    spawn(parity_worker, 1, layout, str(root / "ckpt"), str(root / "ref.pt"))
    return root, torch.load(root / "ref.pt")


@pytest.fixture(scope="module")
def dropless_reference(tmp_path_factory):
    return _reference(tmp_path_factory, None)


@pytest.fixture(scope="module")
def capacity_reference(tmp_path_factory):
    return _reference(tmp_path_factory, 0.5)


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_experts_match_sequential(request, name):
    world, layout = CASES[name]
    reference = request.getfixturevalue(
        "capacity_reference" if "capacity_factor" in layout else "dropless_reference")
    check_layout(reference, world, dict(layout, experts="grouped", packed=True), name,
                 rtol=1e-6)
