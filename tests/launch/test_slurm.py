"""launch/slurm.sbatch under a real single-host SLURM (Debian's slurm-wlm 22.05, started by
the test): a job whose time limit arrives mid-run is signalled (USR1, `--signal`), its ranks
save the current step, the job requeues itself, and the requeued job resumes and finishes with
the losses of an uninterrupted run, bit for bit."""
import time

import pytest

from tests.helpers import slurm, tiny
from tests.helpers.tiny import ENV, ROOT, history, train

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(slurm.unavailable() is not None,
                                 reason=slurm.unavailable() or "")]

ITERS = 250  # runs past 20 s: SLURM's signal may come up to a minute early (here: at 0-20 s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm.Cluster(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()


def wait_for(predicate, timeout: float, what: str, log=None):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"{what}: " + (log.read_text()[-3000:] if log and
                                                      log.exists() else "")
        time.sleep(1)


def test_time_limit_signal_checkpoint_requeue_and_bit_exact_resume(cluster, tmp_path):
    config = tiny.ep2_job(tmp_path, 64, iters=ITERS)
    reference, out, log = tmp_path / "reference", tmp_path / "slurm_run", tmp_path / "job.out"
    train(2, config, f"train.out_dir={reference}")
    submit = cluster.run(
        "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
        "--time=1", "--signal=B:USR1@40", f"--output={log}", "--job-name=pesc-test",
        "launch/slurm.sbatch", str(config), f"train.out_dir={out}", cwd=ROOT,
        env=ENV)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    # the signal: the ranks save the current step, the job requeues itself
    wait_for(lambda: log.exists() and "requeueing job" in log.read_text(), 240,
             "no preemption", log)
    text = log.read_text()
    assert "preempted by SIGUSR1 at step" in text, text[-3000:]
    step = int(text.split("preempted by SIGUSR1 at step ")[1].split()[0])
    assert 1 <= step < ITERS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{step:07d}"
    # the requeued job (SLURM holds it for a while; a longer limit lets it finish at once)
    wait_for(lambda: cluster.job_state(job) == "PENDING", 60, "not requeued", log)
    update = cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", "TimeLimit=10")
    assert update.returncode == 0, update.stderr
    wait_for(lambda: cluster.job_state(job) == "", 600, "the requeued job did not finish", log)
    text = log.read_text()
    assert f"resumed from {out / 'checkpoints' / f'iter_{step:07d}'} at step {step}" in text
    got, want = history(out), history(reference)
    assert sorted(got) == list(range(1, ITERS + 1)), text[-3000:]
    for s in range(1, ITERS + 1):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert got[s][key] == want[s][key], (s, key)
