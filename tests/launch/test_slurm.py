"""launch/slurm.sbatch under a real single-host SLURM (Debian's slurm-wlm 22.05, started by
the test): a job signalled mid-run as before its time limit (USR1 to the batch shell, what
`--signal=B:USR1@N` sends) saves the current step on its ranks and requeues itself, and the
requeued job resumes and finishes with the losses of an uninterrupted run, bit for bit.

The test sends the signal itself (`scancel --signal=USR1 --batch`) once the run is under way:
SLURM's own time-limit signal comes up to a minute early, and on a fast machine the whole
run can end before it (or it comes before the first step)."""
import time

import pytest

from tests.helpers import slurm, tiny
from tests.helpers.tiny import ENV, ROOT, history, train

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(slurm.unavailable() is not None,
                                 reason=slurm.unavailable() or "")]

ITERS = 150
SIGNAL_AT = 3  # the step after which the test signals the job (the rest take several seconds)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm.Cluster(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()


def wait_for(predicate, timeout: float, what: str, log=None, poll: float = 1.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"{what}: " + (log.read_text()[-3000:] if log and
                                                      log.exists() else "")
        time.sleep(poll)


def logged(log, text: str) -> bool:
    return log.exists() and text in log.read_text()


def test_signal_before_time_limit_saves_requeues_and_resumes_bit_exact(cluster, tmp_path):
    config = tiny.ep2_job(tmp_path, 64, iters=ITERS)
    reference, out, log = tmp_path / "reference", tmp_path / "slurm_run", tmp_path / "job.out"
    train(2, config, f"train.out_dir={reference}")
    submit = cluster.run(
        "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
        "--time=30", f"--output={log}", "--job-name=pesc-test",
        "launch/slurm.sbatch", str(config), f"train.out_dir={out}", cwd=ROOT,
        env=ENV)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    wait_for(lambda: logged(log, f"step {SIGNAL_AT}/{ITERS} "), 240, "no training steps", log,
             poll=0.2)
    signal = cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert signal.returncode == 0, signal.stderr
    # the signal: the ranks save the current step, the job requeues itself
    wait_for(lambda: logged(log, "requeueing job"), 240, "no preemption", log)
    text = log.read_text()
    assert "preempted by SIGUSR1 at step" in text, text[-3000:]
    step = int(text.split("preempted by SIGUSR1 at step ")[1].split()[0])
    assert SIGNAL_AT <= step < ITERS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{step:07d}"
    # the requeued job (SLURM holds it for a while before it may start again)
    wait_for(lambda: cluster.job_state(job) == "PENDING", 60, "not requeued", log)
    update = cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert update.returncode == 0, update.stderr
    # its last line, the final metrics (the log is appended to: --open-mode=append)
    wait_for(lambda: logged(log, f'{{"step": {ITERS}, '), 600,
             "the requeued job did not finish", log)
    # and ends without another preemption
    wait_for(lambda: cluster.job_state(job) in ("", "COMPLETING", "COMPLETED"), 60,
             "the requeued job did not end", log)
    text = log.read_text()
    assert text.count("requeueing job") == 1, text[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'iter_{step:07d}'} at step {step}" in text
    got, want = history(out), history(reference)
    assert sorted(got) == list(range(1, ITERS + 1)), text[-3000:]
    for s in range(1, ITERS + 1):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert got[s][key] == want[s][key], (s, key)
