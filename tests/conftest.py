import pytest


@pytest.fixture(scope="session")
def single_rank():
    """A world of one (gloo) with megatron-core's parallel state, for in-process unit tests."""
    from pesc_megatron.config import ParallelConfig
    from pesc_megatron.runtime.distributed import initialize

    initialize(ParallelConfig(), seed=1)
    yield
