"""A real single-host SLURM cluster for the launcher tests: Debian's slurm-wlm (22.05) with
munge, configured in a temporary folder and started as root (tools/install_slurm.sh installs
the packages; .ci/run calls it)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pesc_megatron.parallel.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def unavailable() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): run "
                "tools/install_slurm.sh (as root; .ci/run does)")
    if os.geteuid() != 0:
        return "the single-host SLURM cluster runs its daemons as root"
    return None


CONF = """ClusterName=pesc-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """slurmctld + slurmd on this host (and munged, unless already running)."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = root / "slurm.conf"
        self.conf.write_text(CONF.format(host=socket.gethostname().split(".")[0], root=root,
                                         ctld_port=free_port(), slurmd_port=free_port(),
                                         cpus=os.cpu_count()))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.munged = None
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["munged", "--force"], check=True, capture_output=True)
            self.munged = True
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], env=self.env, check=True)
        deadline = time.time() + 60
        while self.run("sinfo", "-h", "-o", "%T").stdout.strip() != "idle":
            assert time.time() < deadline, (self.root / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)

    def run(self, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster (`env` adds variables)."""
        return subprocess.run(list(args), env=dict(self.env, **(env or {})),
                              capture_output=True, text=True, timeout=60, **kwargs)

    def job_state(self, job: str) -> str:
        """PENDING, RUNNING, ... ; '' once the job has left the queue."""
        return self.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip()

    def stop(self) -> None:
        self.run("scancel", "--user", "root")
        self.run("scontrol", "shutdown")
        if self.munged:
            subprocess.run(["pkill", "-x", "munged"])
