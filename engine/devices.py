"""The device a run asks for, checked before anything is loaded (torch is imported only to check CUDA)."""
from __future__ import annotations

from engine.errors import ConfigError

NO_CUDA = "--device cuda was asked for but PyTorch sees no CUDA device; use --device cpu."


def check_device(device: str) -> None:
    """ConfigError when `device` cannot be used here ("auto" and "cpu" always can)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(NO_CUDA)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX-512 BF16): there, PyTorch's
    bfloat16 matmuls and attention run 3-5x as fast as float32's (an AMX Xeon:
    bench/results/cpu_dtype_cpu.json); elsewhere bfloat16 is emulated and slower than float32."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: absent means "not known"
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def release_accelerator_memory() -> None:
    """After an engine is dropped (out of memory): collect it and hand its cached CUDA blocks back, so
    the next, smaller engine can use them. Best effort: it must not hide the original failure."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
