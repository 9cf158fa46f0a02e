"""batchllm's inference engine: models, paged KV cache, scheduler, sampler. Knows no tables."""
from engine.config import EngineConfig
from engine.errors import ConfigError, EngineError, ModelLoadError
from engine.results import EngineStats, GenerationResult
from engine.sampling_params import SamplingParams

__all__ = [
    "ConfigError",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "GenerationResult",
    "ModelLoadError",
    "SamplingParams",
]
