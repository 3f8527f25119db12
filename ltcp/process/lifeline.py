"""Ties between the supervisor and its workers, through Linux's ``prctl``.

A worker gets SIGTERM (drain, then exit) the moment its supervisor dies
(``die_with``).  The control channel's end says the same, but only to a
worker whose loop reads it; the parent-death signal reaches a worker at any
point of its start.  It is set once the worker is the supervisor's child,
then checked: a supervisor that died before the call leaves no parent to
signal its death.

The supervisor is a child subreaper (``adopt_orphans``): a worker forked by
the template (through a middle process that exits at once) becomes the
supervisor's child, which reaps it as it would a worker it started itself.
"""

import ctypes
import os
import signal

__all__ = ["adopt_orphans", "die_with"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option, value):
    """Whether the call succeeded (False where there is no prctl)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def adopt_orphans():
    """Make this process the parent of descendants whose own parent exits; whether it could."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with(supervisor):
    """Be sent SIGTERM when ``supervisor`` (our parent's pid) exits; at once if it already has.

    Without prctl (not Linux) the channel's end still tells.
    """
    if _prctl(PR_SET_PDEATHSIG, signal.SIGTERM) and os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)
