"""Tie a child process's life to its parent's: the kernel SIGKILLs it when the parent dies
(PR_SET_PDEATHSIG, Linux), so a crashed supervisor or worker leaves nothing behind."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Call in the child (before exec, or first thing after)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux
        pass
