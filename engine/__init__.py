"""batchllm's inference engine: models, paged KV cache, global prefix planning, scheduler, sampler.
Knows no tables.

The public API is exported lazily (PEP 562): `import engine` and `from engine import PackedSequences`
do not import torch; only names whose module needs it (LLMEngine, check_weights, ensure_demo_model)
load it, on first use. The CLI imports the engine only through these names.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.threads import configure_openmp_env

configure_openmp_env()  # before anything imports torch: OpenMP reads its settings once, at load

# name -> module that defines it
_EXPORTS = {
    "LLMEngine": "engine.llm_engine",
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.sampling_params",
    "EngineStats": "engine.results",
    "GenerationResult": "engine.results",
    "Tokenizer": "engine.tokenizer",
    "EngineError": "engine.errors",
    "ConfigError": "engine.errors",
    "ModelLoadError": "engine.errors",
    "load_model_config": "engine.model_config",
    "check_weights": "engine.loader",
    "weight_files": "engine.safetensors_header",
    "check_device": "engine.devices",
    "check_engine_config": "engine.start_checks",
    "release_accelerator_memory": "engine.devices",
    "ensure_demo_model": "engine.demo_model",
    "StructuredOutput": "engine.grammar",
    "compile_constraint": "engine.grammar",
    "answer_matches": "engine.grammar",
    "PackedSequences": "engine.planning",
    "LruPrefixCache": "engine.planning",
    "GroupSizeStats": "engine.planning",
    "PrefixPlan": "engine.planning",
    "ExecutionPlan": "engine.planning",
    "plan_execution": "engine.planning",
    "plan_prefixes": "engine.planning",
    "plan_prefixes_from_sorted_stream": "engine.planning",
    "sort_sequences": "engine.planning",
    "SortedStreamPlanner": "engine.planning",
    "PlanChunk": "engine.planning",
    "cut_sorted_rows": "engine.planning",
    "unique_prompt_tokens": "engine.planning",
    "Partition": "engine.planning",
    "partition_sorted": "engine.planning",
    "group_starts": "engine.planning",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.demo_model import ensure_demo_model
    from engine.devices import check_device, release_accelerator_memory
    from engine.errors import ConfigError, EngineError, ModelLoadError
    from engine.grammar import StructuredOutput, answer_matches, compile_constraint
    from engine.llm_engine import LLMEngine
    from engine.loader import check_weights
    from engine.model_config import load_model_config
    from engine.planning import (
        ExecutionPlan,
        GroupSizeStats,
        LruPrefixCache,
        PackedSequences,
        Partition,
        PlanChunk,
        PrefixPlan,
        SortedStreamPlanner,
        cut_sorted_rows,
        group_starts,
        partition_sorted,
        plan_execution,
        plan_prefixes,
        plan_prefixes_from_sorted_stream,
        sort_sequences,
        unique_prompt_tokens,
    )
    from engine.results import EngineStats, GenerationResult
    from engine.safetensors_header import weight_files
    from engine.sampling_params import SamplingParams
    from engine.start_checks import check_engine_config
    from engine.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
