"""Keep freed activation memory in the process on CPU, instead of handing it back to the kernel.

A CPU forward pass allocates and frees a few dozen multi-megabyte activations per layer. glibc's
malloc serves blocks above its mmap threshold with fresh mmaps and unmaps them on free, and trims
the heap's free top back to the kernel, so a step may page-fault its activations in again. glibc
raises its threshold by itself once it frees a large mmapped block, so how much this costs depends
on the order of a process's allocations: on the vs-vLLM no-sharing shape, 48 rows, a generate call
took 105-157k minor page faults (KV cache first touches: 24k) and 5% more CPU time than with the
thresholds fixed; at 96 rows both had settled (bench/results/raw_engine_ab_cpu.json). A fixed mmap
threshold of 32 MiB (glibc's largest) and a high trim threshold make the good case certain; what a
step uses stays resident until exit (the step's peak, which the process reached anyway).

Only glibc has mallopt; elsewhere, or when the user set glibc's malloc variables, nothing changes.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc caps it at HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit
TRIM_THRESHOLD = 1 << 30
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_done = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; returns whether they are set."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
