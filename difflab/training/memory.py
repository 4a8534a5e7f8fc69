"""Keep freed CPU memory in the process, so each training step reuses it instead of faulting.

PyTorch allocates CPU tensors with the C library's ``malloc`` and frees them when the last
reference goes. glibc's defaults hand large blocks back to the kernel: blocks above the
mmap threshold (adaptive, at most 32 MiB) are ``munmap``-ed on free, and free space at the
top of the heap beyond the trim threshold is released. A training step allocates and frees
the same activations every step, so with the defaults each step takes fresh pages from the
kernel, one page fault and one zeroing per 4 KiB: on the 2-core CPU a difflab step at
32x32 (batch 32) took 40 to 60 thousand faults, and about 10% of its time.

``reuse_freed_memory`` fixes both thresholds (mallopt(3)): the mmap threshold at glibc's
upper bound, so every block under 32 MiB comes from the heap and returns to it, and the trim
threshold at its largest value, so the heap keeps what it has grown to. The cost is memory:
the process's resident size stays at its peak, as with the CUDA caching allocator. It is a
process-wide setting; other C libraries (musl) and other systems are left alone.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
#: glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_INT_MAX = 2**31 - 1  # mallopt takes a C int

_applied = False


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring).

    Returns:
        ``True`` if the settings are in force (now or from an earlier call), ``False`` where
        they do not apply: not Linux, or a C library without glibc's ``mallopt``.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                    and mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _applied
