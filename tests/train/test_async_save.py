"""Background checkpoints (`train.async_save`, megatron-core's async dist_checkpointing):
the same checkpoints and losses as synchronous saves while training goes on, and a kill while
a background save is in flight leaves `latest` on the previous complete checkpoint, from
which the rerun resumes."""
import subprocess
import sys

import pytest
import torch
from megatron.core.dist_checkpointing import load_plain_tensors

from tests.helpers import tiny
from tests.helpers.tiny import ENV, ROOT, history, train

# Every test here starts processes (torchrun).
pytestmark = pytest.mark.multiprocess


def test_background_saves_equal_synchronous_ones(ep2_job, ep2_reference, single_rank):
    root, config = ep2_job
    sync, background = ep2_reference, root / "background"
    run = train(2, config, f"train.out_dir={background}", "train.async_save=true")
    assert "in the background" in run.stdout
    for step in (2, 4, 6, 8):
        name = f"iter_{step:07d}"
        want = load_plain_tensors(str(sync / "checkpoints" / name / "weights"))
        got = load_plain_tensors(str(background / "checkpoints" / name / "weights"))
        assert got.keys() == want.keys()
        for key, t in want.items():
            if torch.is_tensor(t):
                assert torch.equal(got[key], t), (name, key)
    got, want = history(background), history(sync)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for s in want:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert got[s][key] == want[s][key], (s, key)


def test_kill_during_a_background_save_keeps_the_previous_checkpoint(ep2_job):
    root, config = ep2_job
    out = root / "killed_in_background_save"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests" / "helpers" / "slow_async_save.py"), str(config),
         f"train.out_dir={out}", "train.async_save=true"], env=ENV, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tiny.wait_for(proc, lambda: (out / "metrics.jsonl").is_file() and 6 in history(out))
    tiny.kill_tree(proc)  # step 4's save is still being written (its writer sleeps)
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
    assert not (checkpoints / "iter_0000004").exists()
    assert list(checkpoints.glob(".iter_0000004.partial-*"))  # the save that was cut short
    run = train(2, config, f"train.out_dir={out}")
    assert "at step 2" in run.stdout and not list(checkpoints.glob(".iter_*"))
    assert sorted(history(out)) == list(range(1, 9))
