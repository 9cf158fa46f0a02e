"""The CPU KV cache is backed by transparent huge pages where Linux offers them (engine/huge_pages.py):
its memory carries the kernel's huge-page advice before the first block is written, and jobs on it
give the same answers."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from engine.config import EngineConfig
from engine.huge_pages import advise_huge_pages, huge_page_size
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

needs_huge_pages = pytest.mark.skipif(huge_page_size() == 0, reason="no transparent huge pages on this system")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` in this process (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def huge_page_inside(tensor: torch.Tensor) -> int:
    """The address of the first huge page wholly inside the tensor's memory."""
    size = huge_page_size()
    return -(-tensor.data_ptr() // size) * size


@needs_huge_pages
def test_a_large_untouched_tensor_is_advised_and_a_small_one_is_left_alone() -> None:
    size = huge_page_size()
    large = torch.empty(4 * size // 4, dtype=torch.float32)  # 4 huge pages of bytes
    advised = advise_huge_pages(large)
    assert advised >= 3 * size and advised % size == 0
    assert "hg" in vm_flags(huge_page_inside(large))
    small = torch.empty(1024, dtype=torch.float32)
    assert advise_huge_pages(small) == 0


@needs_huge_pages
def test_the_engine_advises_its_cpu_kv_cache_and_answers_the_same(tiny_model_dir: Callable[[str], Path]) -> None:
    model_dir = str(tiny_model_dir("llama_gqa"))
    cache_bytes = 8 * huge_page_size()
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11, 12 + i] for i in range(6)]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    answers = []
    for kv_cache_memory in (cache_bytes, None):
        config = EngineConfig(model_dir=model_dir, device="cpu", dtype="float32", block_size=4,
                              kv_cache_memory=kv_cache_memory, kv_cache_tokens=None if kv_cache_memory else 256)
        engine = LLMEngine(config)
        cache = engine.runner.kv_cache
        if kv_cache_memory:  # big enough for huge pages: advised before any block was written
            assert "hg" in vm_flags(huge_page_inside(cache))
        results = engine.generate((i, p, params) for i, p in enumerate(prompts))
        answers.append(sorted((r.key, r.token_ids) for r in results))
    assert answers[0] == answers[1]
