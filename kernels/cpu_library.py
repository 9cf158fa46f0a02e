"""The compiled CPU library (kernels/csrc/*.cpp): its build, cache, switch and C interface.

One shared library holds every compiled CPU kernel: decode attention (kernels/cpu_decode.py launches
it), prefill attention (kernels/cpu_prefill.py) and a layer's fused elementwise steps
(kernels/cpu_fused.py). It is built at first use with the system's C++ compiler (`$CXX`, else g++, else
c++; a few seconds) into `$BATCHLLM_CACHE_DIR/kernels` (default ~/.cache/batchllm/kernels), named by a
hash of the sources, the flags, the CPU's features (-march=native) and torch's version, checked in a
separate process and stored with its sha256; a later process loads it without compiling when the
checksum matches. Without a compiler, when the build fails, or with BATCHLLM_NATIVE_KERNELS=0,
`native_library()` is None and callers keep their PyTorch paths: the same results, slower. float32
and bfloat16 only (float16 keeps PyTorch).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from kernels import cache_root

__all__ = ["ENTRY_POINTS", "LIBRARY_DTYPES", "SWITCH_ENV", "entry_point", "load_library", "native_kernels_switch",
           "native_library", "native_library_problem"]

# each kernel has one entry point per dtype: NAME_f32, NAME_bf16
_DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
LIBRARY_DTYPES = tuple(_DTYPE_SUFFIX)
SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("decode_attention.cpp", "prefill_attention.cpp", "fused_ops.cpp"))
# included by the sources: part of the build's hash
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("attention_tiles.h", "bf16.h", "threads.h"))
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_ARGTYPES = [_P, _I64, _P, _P, _P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _P,
             _INT, _INT, _INT, _INT, _F, _F, _I64]
_PREFILL_ARGTYPES = [_P, _I64, _P, _P, _P, _I64, _I64, _P, _P, _I64, _INT, _INT, _INT, _INT, _F, _F, _I64]
# every entry point of the library and its C signature (kernels/csrc/*.cpp)
ENTRY_POINTS = {
    **{f"{kernel}_{suffix}": argtypes for kernel, argtypes in (
        ("decode_attention", _ARGTYPES),
        ("prefill_attention", _PREFILL_ARGTYPES),
        ("rms_norm", [_P, _P, _P, _P, _P, _I64, _I64, _F]),
        ("silu_mul", [_P, _P, _I64, _I64]),
        ("rope", [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64]),
        ("store_kv", [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64]),
    ) for suffix in _DTYPE_SUFFIX.values()},
    "greedy_tokens_f32": [_P, _I64, _I64, _I64, _P],
    "set_num_threads": [_INT],
    "parallel_threads": [],
}
# the entry points that return a value (the others return nothing)
_RESTYPES = {"parallel_threads": _INT, **{f"store_kv_{suffix}": _I64 for suffix in _DTYPE_SUFFIX.values()}}


def _cpu_features() -> str:
    """The CPU's flags line: -march=native code is only valid on CPUs with the same features (a cache
    directory on a shared home can be seen by several kinds of machine)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


SWITCH_ENV = "BATCHLLM_NATIVE_KERNELS"
_ON, _OFF = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def native_kernels_switch() -> bool:
    """BATCHLLM_NATIVE_KERNELS as a bool (unset: on). Raises ValueError for a value that is neither."""
    raw = os.environ.get(SWITCH_ENV, "").strip().lower()
    if raw not in _ON + _OFF:
        raise ValueError(f"{SWITCH_ENV}={os.environ[SWITCH_ENV]!r} is neither on (1) nor off (0); unset it, or give 0 "
                         "to run attention, the elementwise steps and the linear layers as plain PyTorch ops.")
    return raw in _ON


class _Build:
    library: ctypes.CDLL | None = None
    problem: str | None = None
    threads = 0  # the thread count last passed to the library


# Run in a fresh interpreter against a new build before it is put in place: a library that does not
# load, or lacks an entry point, is refused there instead of crashing (SIGBUS) or failing every run here.
_PROBE = "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); [getattr(lib, n) for n in sys.argv[2:]]"
STALE_BUILD_S = 3600  # a temporary build file this old was left by a killed build


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compile(target: Path) -> str | None:
    """Builds, checks and installs the library at `target`, its checksum beside it (written after it:
    a library without a matching checksum is never loaded); returns why not, or None."""
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found (set CXX, or install g++)"
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(".build-*"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                stale.unlink()
        except OSError:
            pass
    # built beside the target and renamed into place: processes building at once never load a half-written library
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    tmp_sum = f"{tmp}.sha256"
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return f"{Path(compiler).name} failed: {done.stderr.strip()[-500:]}"
        probe = subprocess.run([sys.executable, "-c", _PROBE, tmp, *ENTRY_POINTS], capture_output=True,
                               text=True, timeout=60)
        if probe.returncode != 0:
            why = probe.stderr.strip().splitlines()[-1:] or [f"exit status {probe.returncode}"]
            return f"{Path(compiler).name} built a library that does not load ({why[0][-300:]})"
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache directory out
        digest = _digest(Path(tmp))
        os.replace(tmp, target)
        Path(tmp_sum).write_text(digest + "\n", encoding="ascii")
        os.chmod(tmp_sum, 0o644)
        os.replace(tmp_sum, target.with_suffix(".sha256"))
    finally:
        for left in (tmp, tmp_sum):
            if os.path.exists(left):
                os.unlink(left)
    return None


def _installed(target: Path) -> bool:
    """Whether `target` is a library this module built and checked, unchanged since (a truncated or
    replaced file would crash or fail the process that loads it)."""
    try:
        return _digest(target) == target.with_suffix(".sha256").read_text(encoding="ascii").strip()
    except OSError:
        return False


@lru_cache(maxsize=1)
def _build() -> _Build:
    build = _Build()
    try:
        if not native_kernels_switch():
            build.problem = f"turned off by {SWITCH_ENV}"
            return build
    except ValueError as exc:
        build.problem = str(exc)
        return build
    try:
        # the compiler is not part of the name: a library built once serves later processes on machines
        # without one (the C interface does not depend on the compiler's version)
        parts = [*(source.read_bytes() for source in SOURCES + HEADERS), " ".join(FLAGS).encode(), _cpu_features().encode(),
                 torch.__version__.encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        target = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
        if not _installed(target):  # never built, or changed since: built (again)
            problem = _compile(target)
            if problem is not None:
                build.problem = problem
                return build
        library = load_library(target)
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        build.problem = f"could not build or load {', '.join(source.name for source in SOURCES)}: {exc}"
        return build
    build.library = library
    return build


def load_library(path: Path) -> ctypes.CDLL:
    """A build of the library at `path`, its entry points' C signatures declared."""
    library = ctypes.CDLL(str(path))
    for name, argtypes in ENTRY_POINTS.items():
        fn = getattr(library, name)
        fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name)
    return library


def native_library() -> ctypes.CDLL | None:
    """The built library (built at the first call), or None: see `native_library_problem`. Its parallel
    loops are told torch's intra-op thread count (BATCHLLM_NUM_THREADS), which its own OpenMP runtime
    would not see."""
    build = _build()
    if build.library is not None:
        threads = torch.get_num_threads()
        if threads != build.threads:
            build.library.set_num_threads(threads)
            build.threads = threads
    return build.library


def entry_point(library: ctypes.CDLL, kernel: str, dtype: torch.dtype) -> Callable[..., None]:
    """The library's entry point of `kernel` for tensors of `dtype` (one of LIBRARY_DTYPES)."""
    return getattr(library, f"{kernel}_{_DTYPE_SUFFIX[dtype]}")


def native_library_problem() -> str | None:
    """Why the compiled library is not available (None when it is)."""
    return _build().problem
