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
