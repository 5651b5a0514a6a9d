"""The non-finite guard through a real `pesc train` under torchrun: a step whose gradients are
NaN on one rank (fault injection, `PESC_FAULT_NONFINITE_STEPS`) is skipped by every rank and
reported; `train.max_skipped_steps` in a row stop the run with a non-zero exit; every
checkpoint on disk holds only finite values, and the run resumes from the newest one."""
import math
import uuid

import pytest
import torch
from megatron.core.dist_checkpointing import load_plain_tensors

from pesc_megatron.train.trainer import FAULT_STEPS_ENV
from tests.helpers.tiny import history, job_processes, train

# Every test here starts processes (torchrun).
pytestmark = pytest.mark.multiprocess


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
