"""Host-built step metadata to the device without a host sync.

`torch.tensor(values, device="cuda")` copies from pageable memory and waits for the stream to
drain, so every metadata tensor built that way stalls the CPU until the GPU has finished all queued
work. Staging through pinned memory and copying with non_blocking=True lets the CPU go on queueing
(the caching host allocator keeps the pinned block alive until its copy has run).
"""
from __future__ import annotations

from typing import Sequence

import torch


def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """values (a list, or a CPU tensor) as a `dtype` tensor on `device`, queued without a sync."""
    device = torch.device(device)
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, values: Sequence) -> None:
    """dst[:] = values (a list of len(dst)), queued without a sync; dst keeps its address."""
    host = torch.tensor(values, dtype=dst.dtype)
    dst.copy_(host.pin_memory() if dst.device.type == "cuda" else host, non_blocking=True)
