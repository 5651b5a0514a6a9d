"""Preemption: SIGTERM or SIGUSR1 to any rank ends a training run at the end of the current
step, with a checkpoint of that step on every rank. The ranks learn of it through one small
all-reduce per step (train/trainer.py), so the signal may reach only some of them (a
scheduler, `kill` on one node). The signals are recorded from the start of `pesc train`
(cli/__init__.py), before its imports, so that one arriving early does not kill a rank."""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The exit code of a preempted run's ranks (sysexits' EX_TEMPFAIL: rerun to continue).
EXIT_PREEMPTED = 75

_received = 0
_previous: dict = {}


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; its message is one line."""


def _record(signum, frame) -> None:
    global _received
    _received = signum


def record_signals() -> None:
    """From now on SIGTERM and SIGUSR1 are recorded (`received`) instead of ending the
    process, until `restore`."""
    for s in SIGNALS:
        _previous.setdefault(s, signal.signal(s, _record))


def received() -> int:
    """The last signal recorded on this rank (0: none)."""
    return _received


def restore() -> None:
    for s, handler in _previous.items():
        signal.signal(s, handler)
    _previous.clear()
