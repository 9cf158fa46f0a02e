"""A CPU engine keeps freed activation memory for the next step (engine/host_memory.py): a large tensor
freed and requested again costs no new page faults, where glibc's default unmaps and faults it again."""
from __future__ import annotations

import platform
import resource
from pathlib import Path
from typing import Callable

import pytest
import torch

from engine.config import EngineConfig
from engine.host_memory import reuse_freed_memory
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")


def faults_of_fresh_tensors(megabytes: int, times: int) -> int:
    """Page faults while a tensor of `megabytes` is made, filled and freed `times` times (after a first)."""
    torch.empty(megabytes << 18).fill_(1.0)  # float32: megabytes << 20 bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(megabytes << 18).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_after_a_cpu_engine_starts_a_step_sized_activation_reuses_freed_memory(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", dtype="float32",
                                    block_size=4, kv_cache_tokens=256))
    results = list(engine.generate([(0, [1, 5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0.0))]))
    assert len(results) == 1
    # 48 MB: above the 32 MiB glibc maps afresh for every request by default (12,288 pages each time)
    assert faults_of_fresh_tensors(48, 5) < 1000


def test_the_users_own_malloc_settings_or_allocator_are_left_alone() -> None:
    for setting in ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                    {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}):
        assert reuse_freed_memory(setting) is False
