"""A worker's tie to its supervisor: SIGTERM (drain, then exit) the moment the supervisor dies.

The control channel's end says the same, but only to a worker whose loop
reads it; Linux's parent-death signal reaches a worker at any point of its
start.  It is set once the worker knows its supervisor's pid, then checked:
a supervisor that died before the call leaves no parent to signal its death.
"""

import ctypes
import os
import signal

__all__ = ["die_with"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with(supervisor):
    """Be sent SIGTERM when ``supervisor`` (our parent's pid) exits; at once if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0
    except (OSError, AttributeError):  # not Linux: the channel's end still tells
        failed = True
    if not failed and os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)
