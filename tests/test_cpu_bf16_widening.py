"""bfloat16 attention on a CPU without AVX-512 BF16: the compiled kernels widen each block of keys and values to
float32 instead of multiplying bfloat16 pairs. This machine has the instructions, so the library is built here a
second time with them turned off (-mno-avx512bf16), loaded in place of the cached one, and checked as the
bfloat16 tests of test_cpu_prefill.py and test_cpu_decode.py check the default build."""
from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch

from kernel_cases import dense_prefill, make_decode_scenario, make_prefill_scenario
from kernels import cpu_library
from test_cpu_decode import _grouped
from test_cpu_prefill import SPANS, TOLERANCE, _prefill

# Elsewhere the default build is the widening one, and the other bfloat16 tests check it already.
needs_compiler = pytest.mark.skipif(
    cpu_library.native_library_problem() is not None or cpu_library._compiler() is None
    or " avx512_bf16" not in cpu_library._cpu_features(),
    reason="no compiled CPU library here, or a CPU without AVX-512 BF16 (its default build widens)",
)


@pytest.fixture(scope="module")
def widening_library(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a ctypes.CDLL
    compiler = cpu_library._compiler()
    assert compiler is not None
    target = tmp_path_factory.mktemp("widening") / "kernels.so"
    done = subprocess.run([compiler, *cpu_library.FLAGS, "-mno-avx512bf16", *map(str, cpu_library.SOURCES), "-o",
                           str(target)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return cpu_library.load_library(Path(target))


@needs_compiler
@pytest.mark.parametrize("window,softcap", [(None, None), (5, 3.0)])
def test_bfloat16_prefill_without_the_dot_products(widening_library, monkeypatch: pytest.MonkeyPatch,
                                                   window: int | None, softcap: float | None) -> None:
    monkeypatch.setattr(cpu_library, "native_library", lambda: widening_library)
    sc = make_prefill_scenario(7, SPANS, 6, 2, 48, 7)
    out = _prefill(sc, window=window, softcap=softcap, dtype=torch.bfloat16)
    rounded = dataclasses.replace(sc, q=sc.q.bfloat16().float(), k_cache=sc.k_cache.bfloat16().float(),
                                  v_cache=sc.v_cache.bfloat16().float())
    expected = rounded.expected() if window is None else dense_prefill(rounded, window, softcap)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[torch.bfloat16],
                               rtol=TOLERANCE[torch.bfloat16])


@needs_compiler
def test_bfloat16_decode_without_the_dot_products(widening_library, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_library, "native_library", lambda: widening_library)
    groups = [(150, [0, 3, 70]), (17, [1] * 9), (32, [0, 0])]
    sc = make_decode_scenario(5, groups, [1, 35, 200], 8, 2, 80, 16)
    _grouped(sc, torch.bfloat16, None, None)
    _grouped(sc, torch.bfloat16, 40, 7.0)
