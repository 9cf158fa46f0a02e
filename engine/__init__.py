"""batchllm's inference engine: models, paged KV cache, scheduler, sampler. Knows no tables."""
from engine.threads import configure_openmp_env

configure_openmp_env()  # before anything imports torch: OpenMP reads its settings once, at load

from engine.config import EngineConfig  # noqa: E402
from engine.errors import ConfigError, EngineError, ModelLoadError  # noqa: E402
from engine.results import EngineStats, GenerationResult  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

__all__ = [
    "ConfigError",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "GenerationResult",
    "ModelLoadError",
    "SamplingParams",
]
