"""Keeping freed memory in the process, so that a training step does not page-fault.

glibc's malloc serves blocks above a threshold (at most 32 MiB by default) with their own mmap and
unmaps them on free. A training step allocates and frees the same large tensors every time (the
tiny model's logits and their gradient are 4096 x 8192 floats, 128 MiB each), so each step maps
them afresh and the kernel zeroes every 4 KiB page again on first touch: about 130,000 page faults
and half a second of system time per step of the default run on a 2-core CPU. Raising the mmap
threshold (and the trim threshold, so the heap top is not handed back either) makes those blocks
come from the heap, where the next step reuses them. The cost is that the process keeps its peak
memory until it exits, which is what a training process does anyway.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Asks glibc to serve blocks below `threshold` bytes from its heap and to keep freed memory
    (process-wide, until exit). Returns False where that is not possible (not Linux, not glibc):
    memory is then handled as before."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl and other C libraries may have a mallopt that does nothing and returns 0
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
