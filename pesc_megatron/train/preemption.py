"""Preemption: SIGTERM or SIGUSR1 to any rank ends the run at the end of the current step,
with a checkpoint of that step on every rank. Every rank learns of it through one small
all-reduce per step, so the signal may reach only some of them (a scheduler, `kill` on one
node)."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from pesc_megatron.parallel.distributed import device

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The exit code of a preempted run's ranks (sysexits' EX_TEMPFAIL: rerun to continue).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; its message is one line."""


class PreemptionWatch:
    """Records SIGTERM / SIGUSR1 instead of dying of them, until `restore()`."""

    def __init__(self):
        self.signum = 0
        self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> int:
        """The signal any rank received (0: none); called by every rank after each step."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
