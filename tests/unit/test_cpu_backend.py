"""Each CPU-backend patch, exercised through the megatron-core code it exists for."""
import pytest
import torch

from pesc_megatron.runtime import cpu_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU backend is CPU-only")


def test_every_patch_is_installed_and_explained(single_rank):
    assert cpu_backend.apply() is True
    for patch in cpu_backend.PATCHES:
        owner, name = cpu_backend._resolve(patch.target)
        replacement = getattr(owner, name)
        assert getattr(replacement, "__module__", None) == cpu_backend.__name__, patch.target
        assert patch.why and "\n" not in patch.why
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None  # defined (as absent), no longer a NameError


def test_cuda_device_requests_land_on_cpu(single_rank):
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda:0").device.type == "cpu"

    class MakesCudaInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad + torch.zeros(grad.shape, device="cuda")

    x = torch.ones(3, requires_grad=True)
    MakesCudaInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_default_causal_mask_and_rope(single_rank):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]
    emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(6)
    assert emb.device.type == "cpu" and emb.shape[0] == 6


def test_streams_and_events_are_inert(single_rank):
    s = torch.cuda.Stream()
    e = torch.cuda.Event()
    e.record()
    s.wait_event(e)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.stream(s):
        pass
    torch.cuda.synchronize()


def test_rng_tracker_forks_the_cpu_generator(single_rank):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advanced
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # and is reproducible from the seed
    with pytest.raises(Exception, match="already exists"):
        tracker.add("model-parallel-rng", 5)


def test_all_to_all_accepts_tensor_split_sizes(single_rank):
    from megatron.core.tensor_parallel.mappings import all_to_all

    group = torch.distributed.new_group([0])
    x = torch.arange(6.0).reshape(3, 2)
    out = all_to_all(group, x, torch.tensor([3]), torch.tensor([3]))
    assert torch.equal(out, x)


def test_router_gating_linear_without_transformer_engine(single_rank):
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x, w = torch.randn(5, 4), torch.randn(3, 4)
    torch.testing.assert_close(router_gating_linear(x, w, None, torch.float32), x @ w.T)


def test_unsupported_megatron_core_is_refused():
    cpu_backend.check_mcore_version("0.16.1")
    cpu_backend.check_mcore_version("0.19.0rc1")
    with pytest.raises(RuntimeError, match="megatron-core 0.20.0 is not supported"):
        cpu_backend.check_mcore_version("0.20.0")


def test_activation_recompute_replays_the_rng(single_rank):
    """tensor_parallel.checkpoint saves and restores RNG states through the patched
    _get/_set_cuda_rng_state: the recomputed dropout mask must equal the first one."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(11)

    def block(x):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, 0.5, training=True) * x

    x = torch.randn(64, requires_grad=True)
    state = torch.get_rng_state()
    tracker_states = tensor_parallel.get_cuda_rng_tracker().get_states()
    plain = block(x)
    plain.sum().backward()
    want = x.grad.clone()

    x.grad = None
    torch.set_rng_state(state)
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)
    out = tensor_parallel.checkpoint(block, False, x)
    assert torch.equal(out, plain)
    out.sum().backward()  # recomputes block: same mask only if the RNG state was replayed
    assert torch.equal(x.grad, want)
