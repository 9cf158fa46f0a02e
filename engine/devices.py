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
