"""Helper processes that die with the process that started them (Linux: PR_SET_PDEATHSIG).
Kept free of heavy imports: a spawned helper imports this module to run `die_with_parent`."""
from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Called first in a helper process: the kernel sends it SIGKILL when its parent dies,
    however that parent ends (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def serve_for_parent() -> None:
    """`die_with_parent` for a server its rank still needs after a signal: a scheduler's
    SIGTERM (or USR1) to every process of a job must not end it before the rank, which saves
    a checkpoint through it on that signal (train/preemption.py)."""
    die_with_parent()
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
