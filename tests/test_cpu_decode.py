"""The compiled CPU decode attention (kernels/cpu_decode.py) equals its definition, and a machine
without it runs the same job through PyTorch.

Definition: `shared_prefix_decode_reference` (groups sharing a prefix, rows without a group) and
`paged_attention_reference` (decode rows, no groups), in float32. Cases: random groups and rows
(GQA ratios 1-8, groups of 1 to 64, empty suffixes, prefixes of 0 tokens and of partial blocks,
NaN in every unwritten cache slot), sliding windows, soft-capping, head sizes 4 to 256, blocks of 1
to 100 tokens (past the kernel's 64-key chunk); bfloat16 within bfloat16's rounding of the inputs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_cases import make_decode_scenario
from kernels import cpu_decode, cpu_library
from kernels.paged_attention import build_paged_batch, paged_attention_reference
from kernels.paged_attention_torch import paged_attention_torch, plan_paged_torch
from kernels.shared_prefix_attention import build_shared_prefix_batch, shared_prefix_decode_reference
from kernels.shared_prefix_torch import plan_shared_prefix_torch, shared_prefix_decode_torch
from test_shared_prefix_attention import _random_case

REPO = Path(__file__).resolve().parent.parent

needs_kernel = pytest.mark.skipif(cpu_library.native_library_problem() is not None,
                                  reason=f"compiled decode attention unavailable: {cpu_library.native_library_problem()}")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def test_the_kernel_is_built_where_a_compiler_is_found() -> None:
    """CI has g++: a build failure must fail here, not silently send every test through PyTorch."""
    if os.environ.get("BATCHLLM_NATIVE_KERNELS", "1") == "0" or not (os.environ.get("CXX") or shutil.which("g++")
                                                                     or shutil.which("c++")):
        pytest.skip("no compiler here, or the kernel is turned off")
    assert cpu_library.native_library_problem() is None
    assert cpu_library.native_library() is not None


def _grouped(sc, dtype: torch.dtype, window: int | None, softcap: float | None, min_group_size: int = 2) -> None:
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids, sc.prefix_lens,
                                      sc.block_size, "cpu", min_group_size=min_group_size)
    q, k, v = sc.q.to(dtype), sc.k_cache.to(dtype), sc.v_cache.to(dtype)
    heads, kv_heads = q.shape[1], k.shape[2]
    out = torch.full_like(q, 5.0)
    plan = plan_shared_prefix_torch(batch, window, heads_per_kv=heads // kv_heads)
    assert cpu_decode.native_decode_usable(q, k, out)
    shared_prefix_decode_torch(q, k, v, plan, sc.scale, out=out, window=window, softcap=softcap)
    ref = shared_prefix_decode_reference(q.float(), k.float(), v.float(), batch, sc.scale, window=window,
                                         softcap=softcap)
    rows = torch.tensor(sc.query_rows, dtype=torch.int64)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 5.0).all(), "rows of q that are not decode rows must be left untouched"
    assert torch.isfinite(out[rows]).all()
    torch.testing.assert_close(out[rows].float(), ref[rows], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_kernel
@pytest.mark.parametrize("seed", range(24))
def test_random_groups_and_rows_equal_the_definition(seed: int) -> None:
    sc = make_decode_scenario(seed, **_random_case(seed))
    window = (None, 5, 30)[seed % 3]
    softcap = 7.0 if seed % 4 == 1 else None
    _grouped(sc, torch.float32, window, softcap)
    _grouped(sc, torch.float32, window, softcap, min_group_size=1)
    _grouped(sc, torch.bfloat16, window, softcap)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 2, 64, 16), (6, 2, 80, 100), (8, 1, 128, 1), (5, 5, 256, 64), (32, 8, 64, 16), (2, 1, 4, 65),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_shapes_and_blocks_longer_than_a_chunk(heads: int, kv_heads: int, head_dim: int, block_size: int,
                                                   dtype: torch.dtype) -> None:
    groups = [(150, [0, 3, 70]), (block_size + 1, [1] * 9), (2 * block_size, [0, 0])]
    sc = make_decode_scenario(heads * 31 + block_size, groups, [1, 2 * block_size + 3, 200], heads, kv_heads,
                              head_dim, block_size)
    _grouped(sc, dtype, None, None)
    _grouped(sc, dtype, 40, None)


@needs_kernel
@pytest.mark.parametrize("window", [None, 3, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_without_groups_equal_the_paged_definition(window: int | None, dtype: torch.dtype) -> None:
    """The no-sharing path (kernels.paged_attention_torch): rows of q outside the decode rows (a
    prefill chunk) untouched; a window cuts whole blocks off the gathered table."""
    heads, kv_heads, head_dim, bs = 8, 2, 32, 8
    sc = make_decode_scenario(11, [], [1, 7, 8, 9, 64, 130], heads, kv_heads, head_dim, bs)
    q, k, v = sc.q.to(dtype), sc.k_cache.to(dtype), sc.v_cache.to(dtype)
    query_lens = [1] * len(sc.query_rows)
    batch = build_paged_batch(query_lens, sc.context_lens, sc.block_tables, bs, torch.device("cpu"), window=window)
    # the batch's decode rows are q's rows 0..n-1 in this layout
    out = torch.full_like(q, 5.0)
    paged_attention_torch(q, k, v, plan_paged_torch(batch), sc.scale, out, window=window)
    ref = paged_attention_reference(q.float(), k.float(), v.float(), batch, sc.scale, window=window)
    n = len(query_lens)
    torch.testing.assert_close(out[:n].float(), ref[:n], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert (out[n:] == 5.0).all()


def _engine_tokens(env: dict[str, str], tmp_path: Path, generate: bool = True) -> dict:
    """In a fresh process with `env` added: native_library_problem(), and (generate) the greedy tokens of a
    small job with shared prefixes and plain rows in plan and in none mode."""
    import json

    script = f"""
import json, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import engine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kernels import cpu_library
from model_factory import VARIANTS, build_model_dir
tokens = {{}}
if {generate!r}:
    model = build_model_dir(VARIANTS["mistral_window"], __import__("pathlib").Path({str(tmp_path / 'model')!r}))
    shared = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    prompts = [shared + [30 + i, 40 + i] for i in range(6)] + [[50 + i] * (3 + i) for i in range(3)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for mode in ("plan", "none"):
        cfg = EngineConfig(model_dir=str(model), device="cpu", dtype="float32", prefix_sharing=mode, block_size=4)
        done = {{r.key: list(r.token_ids) for r in LLMEngine(cfg).generate((i, p, params) for i, p in enumerate(prompts))}}
        tokens[mode] = [done[i] for i in range(len(prompts))]
print(json.dumps({{"problem": cpu_library.native_library_problem(), "tokens": tokens}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "BATCHLLM_CACHE_DIR": str(tmp_path / "cache"),
                               **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_kernel
def test_a_machine_without_a_compiler_runs_the_same_job_through_pytorch(tmp_path: Path) -> None:
    """No compiler on PATH (and no CXX): the engine says why in native_library_problem and produces the
    same greedy tokens as with the kernel (float32, plan and none mode); with the library once built
    into the cache directory, a later process loads it without a compiler."""
    built = _engine_tokens({}, tmp_path)
    assert built["problem"] is None
    assert list((tmp_path / "cache" / "kernels").glob("cpu_kernels-*.so"))
    bare = {"PATH": str(tmp_path / "empty-bin"), "CXX": ""}
    assert _engine_tokens(bare, tmp_path, generate=False)["problem"] is None, "a built library loads without a compiler"
    shutil.rmtree(tmp_path / "cache" / "kernels")
    without = _engine_tokens(bare, tmp_path)
    assert without["problem"] and "compiler" in without["problem"]
    assert without["tokens"] == built["tokens"]
    off = _engine_tokens({"BATCHLLM_NATIVE_KERNELS": "0"}, tmp_path)
    assert off["problem"] and "BATCHLLM_NATIVE_KERNELS" in off["problem"]
    assert off["tokens"] == built["tokens"]


@needs_kernel
def test_queries_laid_out_otherwise_go_through_pytorch() -> None:
    """The kernel reads a row's heads and dims contiguously; q in another layout (a transposed view) is
    not handed to it but still gets the definition's result."""
    sc = make_decode_scenario(5, [(20, [3, 4])], [9], 4, 2, 16, 4)
    q = sc.q.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, dims strided by heads
    out = torch.full_like(sc.q, 5.0)
    assert not cpu_decode.native_decode_usable(q, sc.k_cache, out)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids, sc.prefix_lens,
                                      sc.block_size, "cpu")
    shared_prefix_decode_torch(q, sc.k_cache, sc.v_cache, plan_shared_prefix_torch(batch, heads_per_kv=2), sc.scale,
                               out=out)
    ref = shared_prefix_decode_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale)
    rows = torch.tensor(sc.query_rows)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)


def _problem(env: dict[str, str]) -> str | None:
    """native_library_problem() in a fresh process with `env` added (the build is once per process)."""
    import json

    script = "import json; from kernels import cpu_library; print(json.dumps(cpu_library.native_library_problem()))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_kernel
def test_a_damaged_cached_library_is_built_again(tmp_path: Path) -> None:
    """A truncated library (which crashed the process loading it with SIGBUS), an empty file, or another
    library under the expected name: the next process builds it again."""
    import _ctypes

    env = {"BATCHLLM_CACHE_DIR": str(tmp_path / "cache")}
    assert _problem(env) is None
    (lib,) = (tmp_path / "cache" / "kernels").glob("cpu_kernels-*.so")
    good = lib.read_bytes()
    assert lib.stat().st_mode & 0o777 == 0o755, "other users of a shared cache directory can load it"
    for damage in (good[: len(good) // 2], b"", Path(_ctypes.__file__).read_bytes()):
        lib.write_bytes(damage)
        assert _problem(env) is None
        assert cpu_library._digest(lib) == lib.with_suffix(".sha256").read_text().strip()


@needs_kernel
def test_a_compiler_that_builds_nothing_installs_nothing(tmp_path: Path) -> None:
    """A compiler that exits 0 without a loadable library (CXX=true, a broken wrapper) is refused with
    why, and leaves nothing behind that a later process with a working compiler would load."""
    fake = tmp_path / "bin" / "fake-cxx"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = {"BATCHLLM_CACHE_DIR": str(tmp_path / "cache")}
    problem = _problem({**env, "CXX": str(fake)})
    assert problem is not None and "does not load" in problem
    assert not list((tmp_path / "cache" / "kernels").iterdir())
    assert _problem(env) is None


def test_the_switch_is_on_or_off_and_anything_else_is_refused(monkeypatch, tiny_model_dir) -> None:
    from engine import ConfigError, EngineConfig, LLMEngine

    for value in ("0", "false", " OFF ", "no"):
        monkeypatch.setenv(cpu_library.SWITCH_ENV, value)
        assert cpu_library.native_kernels_switch() is False
    for value in ("1", "true", "Yes", "on", ""):
        monkeypatch.setenv(cpu_library.SWITCH_ENV, value)
        assert cpu_library.native_kernels_switch() is True
    monkeypatch.setenv(cpu_library.SWITCH_ENV, "disabled")
    with pytest.raises(ConfigError, match="BATCHLLM_NATIVE_KERNELS='disabled' is neither on"):
        LLMEngine(EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu"))


@needs_kernel
def test_a_run_without_the_compiled_kernel_says_so(tmp_path: Path, demo_model_dir: Path) -> None:
    """No compiler: the run still succeeds, and says on stderr that decode attention is slower."""
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "batchllm_cli", "run", str(REPO / "examples" / "reviews.csv"), "--template", "classify",
         "--model", str(demo_model_dir), "--limit", "2", "--output", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "BATCHLLM_CACHE_DIR": str(tmp_path / "cache"),
             "PATH": str(tmp_path / "empty-bin"), "CXX": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Decode attention runs as PyTorch ops, slower than the compiled CPU kernel: no C++ compiler found" in proc.stderr
    assert out.exists()


@needs_kernel
def test_the_library_uses_torchs_thread_count() -> None:
    """The library's own OpenMP runtime does not see torch.set_num_threads (BATCHLLM_NUM_THREADS): each
    use passes the count on, so a user who limits the threads limits the compiled kernels too."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            assert cpu_library.native_library().parallel_threads() == threads
    finally:
        torch.set_num_threads(before)
