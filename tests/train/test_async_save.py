"""Background checkpoints (`train.async_save`, megatron-core's async dist_checkpointing):
the same checkpoints and losses as synchronous saves while training goes on, and a kill while
a background save is in flight leaves `latest` on the previous complete checkpoint, from
which the rerun resumes."""
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from megatron.core.dist_checkpointing import load_plain_tensors

from tests.helpers import tiny
from tests.helpers.tiny import ENV, ROOT, history, train

# Every test here starts processes (torchrun).
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def job(tmp_path_factory, single_rank):
    root = tmp_path_factory.mktemp("async_save")
    _, config = tiny.make_job(root, 48, parallel={"ep": 2},
                              train={"iters": 8, "save_interval": 2, "keep_last": 10,
                                     "out_dir": str(root / "unused")})
    return root, config


def test_background_saves_equal_synchronous_ones(job):
    root, config = job
    sync, background = root / "sync", root / "background"
    train(2, config, f"train.out_dir={sync}")
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


def test_kill_during_a_background_save_keeps_the_previous_checkpoint(job):
    root, config = job
    out = root / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests" / "helpers" / "slow_async_save.py"), str(config),
         f"train.out_dir={out}", "train.async_save=true"], env=ENV, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or 6 not in history(out):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    # step 4's save is still being written (its writer sleeps): kill the whole job
    tree = psutil.Process(proc.pid)
    for p in [*tree.children(recursive=True), tree]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
    assert not (checkpoints / "iter_0000004").exists()
    assert list(checkpoints.glob(".iter_0000004.partial-*"))  # the save that was cut short
    run = train(2, config, f"train.out_dir={out}")
    assert "at step 2" in run.stdout and not list(checkpoints.glob(".iter_*"))
    assert sorted(history(out)) == list(range(1, 9))
