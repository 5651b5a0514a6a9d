"""The non-finite guard, on DDP's buffers and through a real `pesc train` under torchrun: a
step whose gradients are NaN on one rank (fault injection, `PESC_FAULT_NONFINITE_STEPS`) is
skipped by every rank and reported; `train.max_skipped_steps` in a row stop the run with a
non-zero exit; every checkpoint on disk holds only finite values, and the run resumes from the
newest one."""
import math
import uuid

import pytest
import torch
from megatron.core.dist_checkpointing import load_plain_tensors

from pesc_megatron.train.trainer import FAULT_STEPS_ENV
from tests.helpers.tiny import history, job_processes, train



# The shared EP=2 job (tests/train/conftest.py), 6 steps with a checkpoint after each.
STEPS = ("train.iters=6", "train.save_interval=1")


def tensors(folder) -> dict:
    return load_plain_tensors(str(folder / "weights"))


def assert_all_finite(checkpoints) -> list:
    folders = sorted(checkpoints.glob("iter_*"))
    for folder in folders:
        for key, t in tensors(folder).items():
            if torch.is_tensor(t) and t.is_floating_point():
                assert torch.isfinite(t).all(), (folder.name, key)
    return [f.name for f in folders]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_guard_sees_one_bad_value_in_any_gradient(single_rank, bad):
    """`all_finite` reads DDP's grad buffers: one NaN or inf anywhere in any trainable
    parameter's main_grad (the last element of each in turn) fails the step; huge finite
    values pass."""
    from pesc_megatron.model.builder import build_model
    from pesc_megatron.model.config import ModelConfig, PESCConfig
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.train.step import all_finite, wrap_ddp

    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=64),
                        PESCConfig(num_experts=4, adapter_dim=8), ParallelConfig())
    ddp = wrap_ddp(model)
    grads = [p.main_grad for p in ddp.parameters() if p.requires_grad]
    for g in grads:
        g.fill_(3e38)
    assert all_finite(ddp, None)
    assert len(ddp.buffers) and len(ddp.expert_parallel_buffers)  # routers and experts
    for g in grads:  # each parameter in turn: its last element
        g.view(-1)[-1] = bad
        assert not all_finite(ddp, None)
        g.view(-1)[-1] = 0.0
    assert all_finite(ddp, {"loss_sum": torch.tensor(1.0)})
    assert not all_finite(ddp, {"loss_sum": torch.tensor(bad)})


@pytest.mark.multiprocess  # starts processes (torchrun)
def test_a_non_finite_step_is_skipped_and_reported(ep2_job, single_rank):
    root, config = ep2_job
    out = root / "one_fault"
    run = train(2, config, f"train.out_dir={out}", *STEPS, env={FAULT_STEPS_ENV: "3"})
    assert "step 3: non-finite loss or gradients" in run.stdout
    rows = history(out)
    assert sorted(rows) == list(range(1, 7))
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]
    assert math.isnan(rows[3]["lm_loss"]) and all(
        math.isfinite(rows[s]["lm_loss"]) for s in (1, 2, 4, 5, 6))
    checkpoints = out / "checkpoints"
    assert assert_all_finite(checkpoints) == [f"iter_{s:07d}" for s in range(1, 7)]
    # the skipped step changed nothing: weights, optimizer state (and the LR schedule, whose
    # step the lr of step 4 shows: the one step 3 would have used)
    before, after = tensors(checkpoints / "iter_0000002"), tensors(checkpoints / "iter_0000003")
    assert before.keys() == after.keys()
    for key, t in before.items():
        if torch.is_tensor(t):
            assert torch.equal(t, after[key]), key
    assert rows[4]["lr"] == rows[3]["lr"]


@pytest.mark.multiprocess
def test_repeated_non_finite_steps_stop_the_run_which_then_resumes(ep2_job, single_rank):
    root, config = ep2_job
    out, tag = root / "stopped", uuid.uuid4().hex
    run = train(2, config, f"train.out_dir={out}", *STEPS, "train.max_skipped_steps=2",
                env={FAULT_STEPS_ENV: "3,4,5", "PESC_TEST_TAG": tag}, check=False)
    assert run.returncode != 0
    assert "pesc train: error: train.max_skipped_steps=2: steps 3-4 all had non-finite" \
        in run.stderr, run.stderr[-2000:]
    assert not job_processes(tag)  # the failed run left no process behind
    checkpoints = out / "checkpoints"
    assert assert_all_finite(checkpoints) == ["iter_0000001", "iter_0000002", "iter_0000003"]
    resumed = train(2, config, f"train.out_dir={out}", *STEPS)
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    rows = history(out)
    assert sorted(rows) == list(range(1, 7)) and all(
        math.isfinite(rows[s]["lm_loss"]) for s in (4, 5, 6))
    assert assert_all_finite(checkpoints)[-1] == "iter_0000006"
