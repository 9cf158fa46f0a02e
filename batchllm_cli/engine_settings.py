"""A run's settings as the engine takes them: its SamplingParams and EngineConfig. A value the engine
rejects is a usage error (exit 2). The engine is imported only when they are built, not with the CLI."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from batchllm_cli.errors import UsageError
from batchllm_cli.job_types import RunSettings
from batchllm_cli.model_setup import DEFAULT_MAX_TOKENS
from batchllm_cli.structured_output import Constraint
from batchllm_cli.templates import PromptTemplate

if TYPE_CHECKING:
    from engine import EngineConfig, SamplingParams


def sampling_params_of(
    settings: RunSettings, template: PromptTemplate, constraint: Constraint | None = None
) -> SamplingParams:
    from engine import SamplingParams

    recipe = template.source.recipe
    max_tokens = settings.max_tokens
    if max_tokens is None:
        max_tokens = recipe.max_tokens if recipe is not None else DEFAULT_MAX_TOKENS
    if any(not text for text in settings.stop):
        raise UsageError('--stop "" is an empty stop string, which would end no answer; drop it or give the text '
                         "to stop at.")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=settings.seed,
            stop=tuple(settings.stop),
            ignore_eos=settings.ignore_eos,
            structured=constraint.to_engine() if constraint is not None else None,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def engine_config_of(settings: RunSettings, model_dir: Path, max_batch_tokens: int | None = None) -> EngineConfig:
    from engine import EngineConfig

    optional = {
        "kv_cache_memory": settings.kv_cache_memory,
        "kv_cache_tokens": settings.kv_cache_tokens,
        "max_batch_tokens": max_batch_tokens or settings.max_batch_tokens,
        "block_size": settings.block_size,
    }
    try:
        return EngineConfig(
            model_dir=str(model_dir),
            device=settings.device,  # type: ignore[arg-type]  # validated by the CLI's choices
            dtype=settings.dtype,  # type: ignore[arg-type]
            prefix_sharing=settings.prefix_sharing,  # type: ignore[arg-type]
            attention_backend=settings.attention_backend,  # type: ignore[arg-type]
            gpu_memory_utilization=settings.gpu_memory_utilization,
            cuda_graphs=settings.cuda_graphs,
            **{k: v for k, v in optional.items() if v is not None},
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def check_engine_start(config: EngineConfig, settings: RunSettings) -> None:
    """What the engine would refuse as it starts that the settings and config.json already show
    (--attention-backend triton without CUDA, a KV budget that holds no block): a UsageError now,
    before the run writes anything. Not for a Ray cluster (--ray-address), whose engines run on
    machines (and devices) this one cannot see: there the engine refuses as it starts."""
    if settings.ray_address is not None:
        return
    from engine import EngineError, check_engine_config, load_model_config

    try:
        check_engine_config(config, load_model_config(config.model_dir))
    except EngineError as exc:
        raise UsageError(str(exc)) from exc
