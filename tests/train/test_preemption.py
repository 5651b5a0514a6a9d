"""Preemption through a real `pesc train` under torchrun: SIGTERM to one rank mid-run makes
every rank save the current step and stop (exit code 75 from the ranks); the rerun resumes
and its losses equal an uninterrupted run's bit for bit. A SIGKILLed rank leaves no process
of the job behind."""
import signal
import time
import uuid

import psutil
import pytest

from pesc_megatron.train.preemption import EXIT_PREEMPTED
from tests.helpers import tiny
from tests.helpers.tiny import history, job_processes, torchrun, train

# Every test here starts processes (torchrun).
pytestmark = pytest.mark.multiprocess


def start(config, out, tag, *overrides):
    proc = torchrun(2, "-m", "pesc_megatron.cli", "train", str(config), f"train.out_dir={out}",
                    *overrides, popen=True, env={"PESC_TEST_TAG": tag})
    tiny.wait_for(proc, lambda: (out / "metrics.jsonl").is_file() and 2 in history(out))
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    return proc, workers


def test_sigterm_to_one_rank_saves_the_step_and_resumes_bit_exact(ep2_job, ep2_reference):
    root, config = ep2_job
    reference, out, tag = ep2_reference, root / "preempted", uuid.uuid4().hex
    proc, workers = start(config, out, tag)
    workers[1].send_signal(signal.SIGTERM)  # one rank only
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and f"exitcode: {EXIT_PREEMPTED}" in output, output[-3000:]
    assert "pesc train: preempted by SIGTERM at step" in output
    step = int(output.split("preempted by SIGTERM at step ")[1].split()[0])
    assert 2 <= step < 8
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{step:07d}"  # (saved now, or by the every-2-steps save)
    assert not job_processes(tag)
    resumed = train(2, config, f"train.out_dir={out}")
    assert f"at step {step}" in resumed.stdout
    got, want = history(out), history(reference)
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert got[s][key] == want[s][key], (s, key)


def test_a_sigkilled_rank_leaves_no_process_behind(ep2_job):
    """Killed after a checkpoint: dist_checkpointing's helper processes exist by then."""
    root, config = ep2_job
    out, tag = root / "killed", uuid.uuid4().hex
    proc, workers = start(config, out, tag)
    tiny.wait_for(proc, (out / "checkpoints" / "latest").is_file)
    workers[0].send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    deadline = time.time() + 30
    while job_processes(tag) and time.time() < deadline:
        time.sleep(0.2)
    assert not job_processes(tag), [p.cmdline() for p in job_processes(tag)]
