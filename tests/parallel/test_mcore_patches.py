"""Each CPU-backend patch, exercised through the megatron-core code it exists for."""
import pytest
import torch

from pesc_megatron.parallel import mcore_patches

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU backend is CPU-only")


def test_every_patch_is_installed_and_explained(single_rank):
    assert mcore_patches.apply() is True
    for patch in mcore_patches.PATCHES + mcore_patches.NO_TE_PATCHES:
        owner, name = mcore_patches._resolve(patch.target)
        replacement = getattr(owner, name)
        assert patch.why and "\n" not in patch.why
        if patch.target.endswith(":te_general_gemm"):
            continue
        assert getattr(replacement, "__module__", None) == mcore_patches.__name__, patch.target
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
    mcore_patches.check_mcore_version("0.16.1")
    mcore_patches.check_mcore_version("0.19.0rc1")
    with pytest.raises(RuntimeError, match="megatron-core 0.20.0 is not supported"):
        mcore_patches.check_mcore_version("0.20.0")


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


# --------------------------------------------------------------------------------------------
# Gradient clipping and the distributed optimizer (megatron-core's optimizers on the CPU).
# --------------------------------------------------------------------------------------------
def _tiny_trainer(dtype="fp32", distributed=False, clip_grad=1e-4, log_num_zeros=False):
    """The tiny PESC model (non-zero adapters, so every trainable tensor has a gradient),
    megatron-core DDP and megatron-core's Adam at one rank."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from pesc_megatron.model.builder import build_model
    from pesc_megatron.model.config import ModelConfig, PESCConfig
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import set_seed
    from pesc_megatron.train.step import wrap_ddp
    from tests.helpers.workers import TINY_MODEL

    set_seed(5)
    model = build_model(ModelConfig(**TINY_MODEL),
                        PESCConfig(num_experts=4, topk=2, adapter_dim=8, adapter_dropout=0.0),
                        ParallelConfig(), dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed)
    bf16 = dtype == "bf16"
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=clip_grad,
                        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                        use_distributed_optimizer=distributed,
                        log_num_zeros_in_grad=log_num_zeros),
        [ddp])
    return model, ddp, opt


def _train_step(ddp, opt):
    from pesc_megatron.train.step import forward_backward
    from tests.helpers.workers import SEQ, global_batch

    ddp.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(ddp, global_batch(), 4, SEQ, 1)
    return opt.step()


def test_tensor_type_names_are_cuda_only_inside_the_patched_calls(single_rank):
    from megatron.core.optimizer import clip_grads

    assert torch.ones(1).type() == "torch.FloatTensor"
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 4.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=8.0)
    torch.testing.assert_close(p.grad, torch.full((3,), 0.5), rtol=1e-5, atol=0)
    assert p.grad.type() == "torch.FloatTensor"


def test_clipped_step_matches_torch(single_rank):
    """The grad norm megatron-core's optimizer returns is the L2 norm over every trainable
    gradient, its zero count is right, and the step equals torch's clip_grad_norm_ + Adam on a
    copy of the parameters with the same gradients."""
    model, ddp, opt = _tiny_trainer(clip_grad=1e-4, log_num_zeros=True)
    from pesc_megatron.train.step import forward_backward
    from tests.helpers.workers import SEQ, global_batch

    ddp.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(ddp, global_batch(), 4, SEQ, 1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("router" in n for n, _ in named) and any("local_experts" in n for n, _ in named)
    ref = {n: torch.nn.Parameter(p.detach().clone()) for n, p in named}
    for n, p in named:
        ref[n].grad = p.main_grad.detach().clone()
    grads = [g.grad for g in ref.values()]
    want_norm = torch.nn.utils.get_total_norm(grads).item()
    want_zeros = sum(int((g == 0).sum()) for g in grads)

    ok, norm, zeros = opt.step()

    assert ok and want_norm > 10 * 1e-4  # clipping is active
    assert norm == pytest.approx(want_norm, rel=1e-6)
    assert zeros == want_zeros
    torch.nn.utils.clip_grad_norm_(list(ref.values()), 1e-4)
    torch.optim.Adam(list(ref.values()), lr=1e-2, weight_decay=0.0).step()
    for n, p in named:
        torch.testing.assert_close(p.detach(), ref[n].detach(), rtol=0, atol=1e-7, msg=n)


@pytest.mark.parametrize("dtype,sharding", [("fp32", "dp_reshardable"),
                                            ("fp32", "fully_reshardable"),
                                            ("bf16", "dp_reshardable")])
def test_distributed_optimizer_steps_and_resumes_from_dist_checkpoint(single_rank, tmp_path,
                                                                      dtype, sharding):
    """The distributed optimizer steps as the plain one (fp32) and its sharded state dict
    round-trips through dist_checkpointing: resuming after step 2 gives step 3's params and
    optimizer state exactly."""
    from megatron.core import dist_checkpointing

    # Megatron-LM's metadata (its default dp_reshardable, or --dist-ckpt-optim-fully-reshardable);
    # megatron-core 0.16's own default, fully_sharded_model_space, is refused by its
    # dist_checkpointing (ShardedTensor.flattened_range), GPU or not.
    meta = {"distrib_optim_sharding_type": sharding, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}
    model, ddp, opt = _tiny_trainer(dtype, distributed=True)
    norms = [_train_step(ddp, opt)[1] for _ in range(2)]
    if dtype == "fp32":
        plain_model, plain_ddp, plain_opt = _tiny_trainer(dtype, distributed=False)
        assert [_train_step(plain_ddp, plain_opt)[1] for _ in range(2)] == \
            pytest.approx(norms, rel=1e-6)
        plain = dict(plain_model.named_parameters())
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, plain[n], rtol=0, atol=1e-6, msg=n)

    sd = model.sharded_state_dict()
    dist_checkpointing.save({"model": sd, "optimizer": opt.sharded_state_dict(sd, metadata=meta)},
                            str(tmp_path))
    _train_step(ddp, opt)

    model2, ddp2, opt2 = _tiny_trainer(dtype, distributed=True)
    sd2 = model2.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": sd2, "optimizer": opt2.sharded_state_dict(sd2, is_loading=True, metadata=meta)},
        str(tmp_path))
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    _train_step(ddp2, opt2)

    resumed = dict(model2.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, resumed[n]), n
    for a, b in zip(opt.chained_optimizers, opt2.chained_optimizers):
        for pa, pb in zip(a.optimizer.param_groups[0]["params"],
                          b.optimizer.param_groups[0]["params"]):
            assert torch.equal(pa, pb)
            sa, sb = a.optimizer.state[pa], b.optimizer.state[pb]
            assert sa.keys() == sb.keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert sb["step"].item() == 3  # the saved step, advanced once
            for k in sa:
                assert torch.equal(sa[k], sb[k]), k
        steps = [s["step"] for s in b.optimizer.state.values()]
        assert len({id(s) for s in steps}) == len(steps)  # one per param, not shared


@pytest.mark.multiprocess
def test_checkpoint_writer_manager_dies_with_its_rank(tmp_path):
    """dist_checkpointing's write-results manager process (made at a rank's first save) is
    SIGKILLed by the kernel when the rank dies, even when the rank is SIGKILLed."""
    import subprocess
    import sys
    import time

    import psutil

    script = (
        "import os, signal, psutil\n"
        "from pesc_megatron.parallel import mcore_patches\n"
        "mcore_patches.apply()\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
        "filesystem_async._get_write_results_queue()\n"
        "print(*[c.pid for c in psutil.Process().children()], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    helpers = [int(pid) for pid in run.stdout.split()]
    assert run.returncode == -9 and helpers, run.stderr[-2000:]
    deadline = time.time() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in helpers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in helpers)
