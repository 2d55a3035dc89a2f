"""Freed memory kept for reuse in long, allocation-heavy commands (``export``, ``quantize``).

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB by default) with a
fresh ``mmap`` and returns it on ``free``. A PyTorch pass over a batch of 256x256 feature maps
allocates hundreds of such blocks (one 67 MB tensor per layer output at batch 8), so every pass
faults in fresh zeroed pages: in the export's bias correction (32 images, simulated INT8) 3.7
million minor faults, 8 of its 15 seconds in the kernel, measured on the 2-core box.
:func:`reuse_freed_memory` raises the mmap threshold and the trim threshold (``mallopt``), so large
blocks come from the heap and freed ones stay there for the next batch: 0.3 million faults, 8 s
in all. The process keeps its peak memory until it exits (what a one-shot command does anyway).

The same as starting Python with ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647``;
a no-op (``False``) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap (and are reused when freed): larger than any tensor of a pass.
MMAP_THRESHOLD = 1 << 30
#: Free memory at the heap's top kept rather than returned to the system.
TRIM_THRESHOLD = (1 << 31) - 1


def reuse_freed_memory() -> bool:
    """Keep freed large blocks in this process's heap for reuse; whether glibc accepted it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["reuse_freed_memory"]
