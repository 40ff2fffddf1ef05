"""Host allocator settings for training on the CPU: reuse large freed blocks, don't re-fault them.

glibc serves every allocation above its mmap threshold (dynamic, at most 32 MB) with a fresh
`mmap` and hands it back to the kernel on `free`. DeepSpeed's ZeRO-1/2 step flattens the
gradient partition into a new buffer every step (130 MB for vit_s16), so each step paid the page
faults and kernel zeroing of that whole buffer again: most of the DeepSpeed step overhead on the
2-core CPU host (bench/RESULTS.md, issue 12). Raising the mmap and trim thresholds keeps freed
blocks in the heap, where the next step's allocation of the same size finds them. No value
computed changes; the process's resident memory stays near its peak instead of shrinking
between steps (what PyTorch's caching allocator does on a GPU anyway).
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks under 1 GiB come from the heap and are reused after free
TRIM_THRESHOLD = 2**31 - 1  # never give the top of the heap back between steps


def keep_freed_host_memory() -> bool:
    """Applies the settings to this process (and DataLoader workers forked later); True when the
    C library took them (glibc), False elsewhere (another libc keeps its own policy: nothing breaks)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the libc this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
