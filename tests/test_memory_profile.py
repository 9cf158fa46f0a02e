"""KV cache sizing on CUDA: what the cache may take after the weights, the profiled step and the
CUDA-graph pool; and the profiling step itself runs (here on CPU) for any token budget."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.memory_profile import CudaMemoryProfile, cuda_kv_budget, profile_step

GIB = 1 << 30


def test_budget_is_utilization_share_minus_everything_else() -> None:
    profile = CudaMemoryProfile(total=100 * GIB, used_before=1 * GIB, weights=5 * GIB // 2, peak=4 * GIB)
    assert profile.activation_peak == 3 * GIB // 2
    # 90 GiB allowed - 1 in use before - 4 peak (weights + activations) - 1.5 for the graph pool
    assert cuda_kv_budget(profile, 0.9, graphs=True) == 90 * GIB - GIB - 4 * GIB - 3 * GIB // 2
    assert cuda_kv_budget(profile, 0.9, graphs=False) == 90 * GIB - GIB - 4 * GIB
    # another process holding most of the GPU leaves nothing
    busy = CudaMemoryProfile(total=100 * GIB, used_before=88 * GIB, weights=2 * GIB, peak=3 * GIB)
    assert cuda_kv_budget(busy, 0.9, graphs=True) <= 0


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_utilization_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model_dir="m", gpu_memory_utilization=value)


def test_profile_step_runs_a_full_budget_step_split_by_max_model_len(tiny_model_dir) -> None:
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", kv_cache_tokens=64))
    runner = engine.runner
    runner.kv_cache.zero_()
    # 300 tokens with sequences of at most 128: three sequences, more than the real 64-token cache holds
    profile_step(runner.model, runner.attention_backend, runner.model_cfg, num_tokens=300, num_seqs=256,
                 max_model_len=128, block_size=runner.block_size, device=runner.device, dtype=runner.dtype)
    assert not runner.kv_cache.any()  # it used a scratch cache, not the engine's
