"""Decode attention over the paged KV cache on CPU in compiled code (kernels/csrc/decode_attention.cpp).

Meaning: exactly `kernels.shared_prefix_attention.shared_prefix_decode_reference` for a step's decode
rows (with no groups, `kernels.paged_attention.paged_attention_reference` for decode rows); tests
compare them. Why compiled code: PyTorch's CPU attention pays a fixed cost per (row, KV head) and the
PyTorch paths gather every row's keys into a buffer first; this kernel reads the cache in place, keeps
a row's query heads together, and reads a group's prefix once for a tile of its members, through the
blocked loop the prefill kernel uses (kernels/csrc/attention_tiles.h). On a 2-core AMD EPYC it was
1.04-2.0x as fast per call as the PyTorch paths for rows without groups and 1.07-2.9x for groups of
2 to 64 members (bench/cpu_decode_attention.py, bench/results/cpu_decode_attention_cpu.json).

The library is built at first use with the system's C++ compiler (`$CXX`, else g++, else c++; about a
second) into `$BATCHLLM_CACHE_DIR/kernels` (default ~/.cache/batchllm/kernels), named by a hash of the
source, the flags, the CPU's features (-march=native) and torch's version, and stored with its sha256;
a later process loads it without compiling when the checksum matches. Without a compiler, when the
build fails, or with BATCHLLM_NATIVE_KERNELS=0, `native_decode_library()` is None and callers keep
their PyTorch paths: the same results, slower. float32 and bfloat16 only (float16 keeps PyTorch).
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from kernels import cache_root

__all__ = ["DecodeRows", "NATIVE_DTYPES", "SWITCH_ENV", "native_decode", "native_decode_library",
           "native_decode_problem", "native_decode_usable", "native_kernels_switch"]

# one library: decode attention (this module's launcher), prefill attention (kernels/cpu_prefill.py's) and
# a layer's fused elementwise steps (kernels/cpu_fused.py's)
SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("decode_attention.cpp", "prefill_attention.cpp", "fused_ops.cpp"))
# included by the sources: part of the build's hash
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("attention_tiles.h", "threads.h"))
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
NATIVE_DTYPES = {torch.float32: "decode_attention_f32", torch.bfloat16: "decode_attention_bf16"}
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_ARGTYPES = [_P, _I64, _P, _P, _P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _P,
             _INT, _INT, _INT, _INT, _F, _F, _I64]
PREFILL_ENTRIES = {torch.float32: "prefill_attention_f32", torch.bfloat16: "prefill_attention_bf16"}
_PREFILL_ARGTYPES = [_P, _I64, _P, _P, _P, _I64, _I64, _P, _P, _I64, _INT, _INT, _INT, _INT, _F, _F, _I64]
# every entry point of the library and its C signature (kernels/csrc/*.cpp)
ENTRY_POINTS = {
    **{name: _ARGTYPES for name in NATIVE_DTYPES.values()},
    **{name: _PREFILL_ARGTYPES for name in PREFILL_ENTRIES.values()},
    **{name: [_P, _P, _P, _P, _P, _I64, _I64, _F] for name in ("rms_norm_f32", "rms_norm_bf16")},
    **{name: [_P, _P, _I64, _I64] for name in ("silu_mul_f32", "silu_mul_bf16")},
    "rope_f32": [_P, _I64, _P, _P, _P, _I64, _I64, _I64],
    "set_num_threads": [_INT],
    "parallel_threads": [],
}


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
                         "to run decode attention and the linear layers as plain PyTorch ops.")
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
        target = cache_root() / "kernels" / f"decode_attention-{key}.so"
        if not _installed(target):  # never built, or changed since: built (again)
            problem = _compile(target)
            if problem is not None:
                build.problem = problem
                return build
        library = ctypes.CDLL(str(target))
        for name, argtypes in ENTRY_POINTS.items():
            fn = getattr(library, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int if name == "parallel_threads" else None
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        build.problem = f"could not build or load {', '.join(source.name for source in SOURCES)}: {exc}"
        return build
    build.library = library
    return build


def native_decode_library() -> ctypes.CDLL | None:
    """The built library (built at the first call), or None: see `native_decode_problem`. Its parallel
    loops are told torch's intra-op thread count (BATCHLLM_NUM_THREADS), which its own OpenMP runtime
    would not see."""
    build = _build()
    if build.library is not None:
        threads = torch.get_num_threads()
        if threads != build.threads:
            build.library.set_num_threads(threads)
            build.threads = threads
    return build.library


def native_decode_problem() -> str | None:
    """Why the compiled decode attention is not available (None when it is)."""
    return _build().problem


@dataclass(frozen=True)
class DecodeRows:
    """A step's decode rows as the kernel reads them (kernels.shared_prefix_attention.SharedPrefixBatch's
    fields, contiguous CPU tensors), built once per step and reused by every layer. Positions of a row's
    keys are counted from its table's column 0 = block table_starts[r]; with no groups each row's whole
    context is its "suffix"."""

    query_index: torch.Tensor  # [R] int64: row of q and of out
    tables: torch.Tensor  # [R, max_blocks] int32
    table_starts: torch.Tensor  # [R] int32
    context_lens: torch.Tensor  # [R] int32: keys of the row, its query token included
    suffix_starts: torch.Tensor  # [R] int32: first key after the row's group prefix (0: no group)
    group_row_starts: torch.Tensor  # [G + 1] int32: group g's rows are [starts[g], starts[g + 1])
    prefix_tables: torch.Tensor  # [G, max_prefix_blocks] int32
    prefix_lens: torch.Tensor  # [G] int32

    @staticmethod
    def of(query_index: torch.Tensor, tables: torch.Tensor, table_starts: torch.Tensor, context_lens: torch.Tensor,
           suffix_starts: torch.Tensor, group_row_starts: torch.Tensor, prefix_tables: torch.Tensor,
           prefix_lens: torch.Tensor) -> DecodeRows:
        def i32(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", torch.int32).contiguous()

        def matrix(t: torch.Tensor, rows: int) -> torch.Tensor:  # [rows, columns], also for 0 rows
            return i32(t).reshape(rows, t.numel() // rows if rows else 0)

        return DecodeRows(query_index.to("cpu", torch.int64).contiguous(), matrix(tables, query_index.shape[0]),
                          i32(table_starts), i32(context_lens), i32(suffix_starts), i32(group_row_starts),
                          matrix(prefix_tables, prefix_lens.shape[0]), i32(prefix_lens))

    @staticmethod
    def without_groups(query_index: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor) -> DecodeRows:
        rows = query_index.shape[0]
        zeros = torch.zeros(rows, dtype=torch.int32)
        empty = torch.zeros(0, dtype=torch.int32)
        return DecodeRows.of(query_index, tables, zeros, context_lens, zeros, torch.zeros(1, dtype=torch.int32),
                             empty, empty)


def native_decode_usable(q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `native_decode` can serve these tensors (else the caller's PyTorch path)."""
    head_dim = q.shape[-1]
    return (q.device.type == "cpu" and q.dtype in NATIVE_DTYPES and q.dtype == k_cache.dtype == out.dtype
            and q.dim() == 3 and q.stride()[1:] == (head_dim, 1) and out.stride()[1:] == (head_dim, 1)
            and k_cache.is_contiguous()
            and not (torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad))
            and native_decode_library() is not None)


def native_decode(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], heads and dims contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    rows: DecodeRows,
    scale: float,
    out: torch.Tensor,  # like q: rows rows.query_index are written, others untouched
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    library = native_decode_library()
    assert library is not None and native_decode_usable(q, k_cache, out)
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert v_cache.is_contiguous() and v_cache.dtype == k_cache.dtype
    assert k_cache.shape[-1] == head_dim and num_heads % num_kv_heads == 0
    assert (softcap is None or softcap > 0) and (window is None or window > 0)
    groups = rows.prefix_lens.shape[0]
    getattr(library, NATIVE_DTYPES[q.dtype])(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), out.stride(0),
        rows.query_index.shape[0], rows.query_index.data_ptr(), rows.tables.data_ptr(), rows.tables.shape[1],
        rows.table_starts.data_ptr(), rows.context_lens.data_ptr(), rows.suffix_starts.data_ptr(), groups,
        rows.group_row_starts.data_ptr(), rows.prefix_tables.data_ptr(), rows.prefix_tables.shape[1],
        rows.prefix_lens.data_ptr(), num_heads, num_kv_heads, head_dim, k_cache.shape[1], scale, softcap or 0.0,
        window or 0)
    return out
