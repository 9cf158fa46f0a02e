"""Host memory for a step's activations: freed blocks are reused, not given back and faulted in again.

PyTorch's CPU tensors come from the C library's malloc. glibc serves a request above its mmap threshold
(128 KiB at first, rising with what is freed, to at most 32 MiB) with a fresh mapping and unmaps it on
free, so the next request of that size faults every page in again. A step's large activations are
freed and requested again every step: a real model's MLP activation of a 1,024-token step (gate and up,
hidden 2,048: ~45 MB; 4,096: ~90 MB) is above 32 MiB, and each one cost ~10-25 ms of page faults on a
2-core VM (a 90 MB allocation and fill: 24 ms, against 1.6 ms reusing freed memory). So once the engine
holds its weights and KV cache, `reuse_freed_memory` asks glibc to serve requests up to 1 GiB from its
heap and never to trim the heap's free top: freed activations stay mapped for the next step, as the
tcmalloc or jemalloc that CPU inference guides preload would keep them. The cost: the process keeps its
peak of transient memory (a step's activations) mapped until it exits. The KV cache (allocated before,
in its own mapping) and the weights are unaffected.

Only with glibc, and only when the user has not tuned malloc (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES) or preloaded another allocator (LD_PRELOAD).
"""
from __future__ import annotations

import ctypes
import os
import platform
from typing import Mapping

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # requests up to this come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # an int: the heap's free top is kept up to ~2 GiB
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def reuse_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Sets glibc's malloc to keep freed large blocks for reuse (see the module's note); returns whether
    it did (False: not glibc, the user's own malloc settings or allocator, or glibc refused)."""
    if any(environ.get(name) for name in _USER_SETTINGS) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the threshold first: setting the trim threshold alone would also fix the mmap threshold at 128 KiB
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
