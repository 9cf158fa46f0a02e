"""KV cache sizing: how many bytes the cache may take on a device.

On CUDA the cache gets what is left of `gpu_memory_utilization` x total memory once we subtract
what was in use before the engine started (other processes, our CUDA context), the weights, and
the activation peak of the largest step, measured by running one (`profile_step`). The activation
peak is subtracted a second time as room for the CUDA graph memory pool, whose decode batches are
never larger than that step. On CPU the default is a fixed share of RAM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.model_config import ModelConfig
from engine.sampler import SamplingTensors, sample
from engine.step_context import StepContext

_CPU_DEFAULT_KV_FRACTION = 0.10
_CPU_DEFAULT_KV_MAX = 4 << 30


@dataclass(frozen=True)
class CudaMemoryProfile:
    """Bytes measured on the GPU while the engine starts."""

    total: int  # the device's memory
    used_before: int  # in use before the engine loaded anything (total - free)
    weights: int  # allocated by torch after loading the model
    peak: int  # torch's peak allocation during the profiling step (weights included)

    @property
    def activation_peak(self) -> int:
        return max(0, self.peak - self.weights)


def cuda_kv_budget(profile: CudaMemoryProfile, utilization: float, graphs: bool) -> int:
    """Bytes the KV cache may take (may be <= 0: nothing left)."""
    allowed = int(profile.total * utilization)
    graph_pool = profile.activation_peak if graphs else 0
    return allowed - profile.used_before - profile.peak - graph_pool


def cpu_kv_budget() -> int:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return min(_CPU_DEFAULT_KV_MAX, int(ram * _CPU_DEFAULT_KV_FRACTION))


@torch.inference_mode()
def profile_step(
    model: torch.nn.Module,
    backend,
    model_cfg: ModelConfig,
    *,
    num_tokens: int,
    num_seqs: int,
    max_model_len: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Runs the most memory-hungry step the scheduler can issue: `num_tokens` prefill tokens (in
    sequences no longer than max_model_len), logits for up to `num_seqs` rows and top-p sampling,
    against a scratch KV cache just large enough for it. Measure around it; the result is unused."""
    lens: list[int] = []
    left = num_tokens
    while left > 0:
        lens.append(min(left, max_model_len))
        left -= lens[-1]
    tables: list[list[int]] = []
    next_block = 0
    for n in lens:
        blocks = -(-n // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    shape = (model_cfg.num_layers, 2, next_block, block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    kv_caches = tuple((cache[i, 0], cache[i, 1]) for i in range(model_cfg.num_layers))
    meta = backend.build_step_metadata(
        lens, lens, tables, block_size, device,
        num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads,
    )
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    slots = torch.cat([torch.tensor(t).repeat_interleave(block_size)[:n] * block_size
                       + torch.arange(n) % block_size for n, t in zip(lens, tables)]).to(device)
    ctx = StepContext(backend, kv_caches, slots, meta)
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model(input_ids, positions, ctx)
    rows = min(num_seqs, num_tokens)
    logits = model.compute_logits(hidden[:rows]).float()
    sample(logits, SamplingTensors(
        temperatures=torch.ones(rows, device=device),
        top_ks=torch.full((rows,), 50, dtype=torch.int64, device=device),
        top_ps=torch.full((rows,), 0.9, device=device),
        keys=torch.arange(rows, dtype=torch.int64, device=device),
        steps=torch.zeros(rows, dtype=torch.int64, device=device),
        all_greedy=False, any_top_k=True, any_top_p=True,
    ))
