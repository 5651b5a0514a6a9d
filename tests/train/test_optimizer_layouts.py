"""megatron-core's optimizers on 2 gloo ranks: gradient clipping by the global grad norm, and
the distributed optimizer, which must train as the plain one and resume from a dist checkpoint."""
import pytest
import torch

from tests.helpers.optimizer_workers import CLIP, optimizer_worker
from tests.helpers.workers import spawn_per_rank

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

RUNS = {  # name: (layout, distributed-optimizer checkpoint format); one spawn for both
    "dp2": (dict(), "dp_reshardable"),  # dense and expert params data-parallel over 2 ranks
    "ep2": (dict(ep=2), "fully_reshardable"),  # dense params over 2 DP ranks, experts split
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_per_rank(optimizer_worker, 2, RUNS, tmp_path_factory.mktemp("optimizer"))


@pytest.mark.parametrize("name", list(RUNS))
def test_clipping_and_distributed_optimizer(results, name):
    ranks = [r[name] for r in results]
    assert ranks[0]["dp"] == 2
    for got in ranks:
        plain, distributed = got["plain"], got["distributed"]
        # The plain optimizer's norm is the L2 norm of all trainable grads (experts included).
        assert plain["norms"] == pytest.approx(plain["expected"], rel=1e-6)
        assert plain["norms"][0] > 10 * CLIP  # clipping is active
        assert distributed["norms"] == pytest.approx(plain["norms"], rel=1e-6)
        assert plain["params"].keys() == distributed["params"].keys()
        for key, want in plain["params"].items():
            torch.testing.assert_close(distributed["params"][key], want, rtol=0, atol=1e-6,
                                       msg=key)
            # Resumed at step SAVE_AFTER from the dist checkpoint: the same params exactly.
            assert torch.equal(got["resumed"]["params"][key], distributed["params"][key]), key
    # Every rank clipped by the same global norm.
    assert ranks[0]["plain"]["norms"] == ranks[1]["plain"]["norms"]
    assert ranks[0]["distributed"]["norms"] == ranks[1]["distributed"]["norms"]
