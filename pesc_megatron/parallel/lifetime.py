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
