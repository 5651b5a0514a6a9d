"""One tiny EP=2 job and its uninterrupted run, shared by the tests that interrupt, fault or
background-save the same job (each run is a torchrun launch: tens of seconds on 2 cores)."""
import pytest

from tests.helpers import tiny


@pytest.fixture(scope="session")
def ep2_job(tmp_path_factory):
    """(root, job file): 8 steps, a checkpoint every 2, all kept."""
    root = tmp_path_factory.mktemp("ep2_job")
    return root, tiny.ep2_job(root, 48, iters=8, save_interval=2, keep_last=10)


@pytest.fixture(scope="session")
def ep2_reference(ep2_job):
    """The job run without interruption (synchronous saves): its output folder."""
    root, config = ep2_job
    tiny.train(2, config, f"train.out_dir={root / 'reference'}")
    return root / "reference"
