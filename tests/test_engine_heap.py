"""The engine freezes the heap its process starts with (engine.llm_engine.freeze_startup_heap), so the garbage
collector's full passes during a job scan only the job's own objects; that is safe only while a
dropped engine is freed by reference counting alone, which these tests hold it to."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Callable

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize("mode", ["plan", "lru", "none"])
def test_a_dropped_engine_is_freed_without_the_garbage_collector(
    tiny_model_dir: Callable[[str], Path], mode: str
) -> None:
    cfg = EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", dtype="float32",
                       prefix_sharing=mode, block_size=4, kv_cache_tokens=512)
    engine = LLMEngine(cfg)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11, 12 + i] for i in range(6)]
    assert len(list(engine.generate((i, p, params) for i, p in enumerate(prompts)))) == 6
    parts = [engine, engine.runner, engine.runner.model, engine.scheduler, engine.block_manager]
    refs = [weakref.ref(part) for part in parts]
    gc.disable()  # a frozen object in a reference cycle would never be collected: there must be none
    try:
        del parts, engine
        assert [ref() for ref in refs] == [None] * len(refs)
    finally:
        gc.enable()


def test_a_full_collection_during_a_job_does_not_scan_the_startup_heap(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    gc.unfreeze()  # as in a fresh process, whatever an earlier test's engine froze
    before = len(gc.get_objects())  # the imports, pytest and the test's fixtures: thousands
    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", kv_cache_tokens=512))
    # get_objects() lists what a collection would scan; frozen objects are not among them
    assert before > 20_000 and len(gc.get_objects()) < 2_000
    del engine


class _Payload:
    """Stands in for a dropped engine's memory; a weak reference says when it is freed."""


def test_a_later_engine_does_not_freeze_a_garbage_cycle_holding_a_dropped_engine(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    # The out-of-memory retry builds a new engine while the error's traceback (a reference cycle) still
    # holds the old one: freezing that cycle would keep the old engine's memory for good.
    cfg = EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", kv_cache_tokens=512)
    first = LLMEngine(cfg)  # the process's heap is frozen by now (here or by an earlier test)
    payload = _Payload()
    cycle: list[object] = [payload]
    cycle.append(cycle)
    ref = weakref.ref(payload)
    del payload
    second = LLMEngine(cfg)  # built while the cycle is alive
    del cycle
    gc.collect()
    assert ref() is None
    del first, second
