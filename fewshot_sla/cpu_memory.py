"""Keep freed tensor memory in the process on glibc, so that large CPU tensors are not page-faulted in anew.

PyTorch's CPU allocator calls ``malloc``/``free``. glibc serves every block above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and gives it back to the OS on ``free``, so each training step touches its
activations' pages for the first time again: one page fault per 4 KiB, plus zeroing. A meta-batch of 8 SLA
episodes through Conv-4 at 32x32 allocates several 250 MB activations per step; on the 2-core CI machine those
faults made the per-episode cost grow with the meta-batch size (meta-batch 8 was 0.56-0.7x as fast per episode
as meta-batch 1) and made an SLA step cost 5x a baseline step instead of the 4x of its extra images.

``reuse_freed_memory`` asks glibc to serve every block from its heap and never to shrink it, so after the first
steps the same pages are reused. The cost: the process keeps its peak memory until it exits. It changes the
whole process, so only the command-line entry points call it (``fewshot-sla run`` / ``eval`` on the CPU, unless
``--default-malloc``); the library never does, on import or in a call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int; 2 GiB of free heap top before glibc shrinks the heap

_applied = False


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - both must exist; only glibc has gnu_get_libc_version (musl's mallopt
        libc.gnu_get_libc_version  # noqa: B018 - ignores these parameters)
    except (OSError, AttributeError):
        return None
    return libc


def glibc_available() -> bool:
    """Whether ``reuse_freed_memory`` can take effect here (changes nothing)."""
    return _glibc() is not None


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (idempotent); True when it is in effect, False where the C
    library is not glibc (macOS, Windows, musl), in which case nothing changes."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _applied
