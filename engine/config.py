"""Engine settings chosen by the caller (not read from the model directory)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
PrefixSharing = Literal["plan", "lru", "none"]
AttentionBackendName = Literal["auto", "torch", "triton"]


@dataclass(frozen=True)
class EngineConfig:
    """How to run a model.

    kv_cache_memory: bytes of KV cache (all layers, K and V); None picks a default for the device.
    kv_cache_tokens: optional cap on the cache size in tokens, applied after the byte budget.
    max_batch_tokens: token budget of one step (decode tokens + prefill chunks); also the largest
        prefill chunk, so a longer prompt is spread over several steps.
    max_num_seqs: upper bound on sequences running at once (memory is the real limit).
    prefix_sharing: "plan" computes every shared prefix once from a global plan of each wave of
        requests; "lru" is an online engine's automatic prefix cache (hashed full blocks, LRU
        eviction, arrival order); "none" computes every prompt in full.
    decode_reservation: fraction of each row's remaining max tokens whose KV blocks admission
        reserves (1.0: admitted rows never need preemption; lower admits more optimistically).
    learn_decode_lengths: once 32 rows have finished, reserve decode growth only up to the length
        95% of their answers stayed within, when that is below max tokens (a row past it reserves up
        to max tokens again; see engine/scheduler.py); False: always up to max tokens.
    plan_wave_rows: requests planned together; a prefix shared across waves is computed per wave.
    attention_backend: "torch" (PyTorch references), "triton" (kernels), "auto" (triton on CUDA).
    gpu_memory_utilization: on CUDA without kv_cache_memory, the fraction of the GPU's total memory
        this engine may use: the KV cache gets it minus what was in use before the engine started
        and the peak of a profiling forward pass at max_batch_tokens.
    cuda_graphs: on CUDA with the triton backend, replay captured CUDA graphs for decode-only steps
        (batch sizes padded to a few buckets); False runs every step eagerly.
    """

    model_dir: str
    device: Device = "auto"
    dtype: DType = "auto"
    block_size: int = 16
    kv_cache_memory: int | None = None
    kv_cache_tokens: int | None = None
    max_batch_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    prefix_sharing: PrefixSharing = "plan"
    decode_reservation: float = 1.0
    learn_decode_lengths: bool = True
    plan_wave_rows: int = 65536
    attention_backend: AttentionBackendName = "auto"
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be positive.")
        if self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive.")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be positive.")
        if self.prefix_sharing not in ("plan", "lru", "none"):
            raise ValueError("prefix_sharing must be plan, lru or none.")
        if not 0.0 <= self.decode_reservation <= 1.0:
            raise ValueError("decode_reservation must be between 0 and 1.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be above 0 and at most 1.")
        if self.plan_wave_rows < 1:
            raise ValueError("plan_wave_rows must be positive.")
