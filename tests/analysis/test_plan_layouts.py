"""`pesc plan`'s bookkeeping against what megatron-core allocates on 4 gloo ranks: for each
rank, the bytes of frozen and trainable parameters, of DDP's gradient buffers, of the
optimizer state and of the frozen base converted to FP8 and to NF4 must equal the planner's formulas
exactly."""
import pytest

from tests.helpers.plan_workers import plan_worker
from tests.helpers.workers import spawn_per_rank

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

RUNS = {  # one spawn for all (start-up dominates)
    "tp2_ep2_lora": dict(layout=dict(tp=2, ep=2), lora=True, tied=False, distributed=False),
    "tp2_ep2_lora_distopt": dict(layout=dict(tp=2, ep=2), lora=True, tied=False,
                                 distributed=True),
    "dp4_distopt": dict(layout=dict(), lora=False, tied=True, distributed=True),
    "dp4": dict(layout=dict(), lora=False, tied=False, distributed=False),
    "pp2_tp2_lora_tied": dict(layout=dict(tp=2, pp=2), lora=True, tied=True, distributed=False),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_per_rank(plan_worker, 4, RUNS, tmp_path_factory.mktemp("plan"))


@pytest.mark.parametrize("name", list(RUNS))
def test_planner_equals_allocated_bytes(results, name):
    for rank, result in enumerate(results):
        got = result[name]
        assert min(got["measured"].values()) > 0, f"rank {rank}"
        assert got["predicted"] == got["measured"], f"rank {rank}"


def test_the_distributed_optimizer_shards_the_state(results):
    for result in results:
        assert result["dp4_distopt"]["measured"]["optimizer"] * 4 == \
            result["dp4"]["measured"]["optimizer"]
        assert result["tp2_ep2_lora_distopt"]["measured"]["optimizer"] * 2 == \
            result["tp2_ep2_lora"]["measured"]["optimizer"]
