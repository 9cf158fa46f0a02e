"""Settings the engine refuses as it starts that can be found before any weight loads: an attention
backend the device cannot run, and a KV cache budget that holds no block. ModelRunner runs these
checks as the engine starts; a caller runs `check_engine_config` earlier (the CLI, before it writes
anything), so a refused run leaves nothing behind. torch is imported only where a check needs it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.errors import ConfigError
from kernels import backend_device_problem

if TYPE_CHECKING:
    from engine.model_config import ModelConfig


def check_attention_backend(name: str, device_type: str) -> None:
    """ConfigError when the attention backend `name` cannot run on a `device_type` device."""
    problem = backend_device_problem(name, device_type)
    if problem is not None:
        raise ConfigError(f"--attention-backend {name}: {problem}")


def kv_token_cap_blocks(cfg: EngineConfig) -> int | None:
    """The blocks cfg.kv_cache_tokens caps the KV cache at (None: no cap); ConfigError when it leaves none."""
    tokens = cfg.kv_cache_tokens
    if tokens is None:
        return None
    if tokens < 1:
        raise ConfigError(f"--kv-cache-tokens {tokens} leaves the KV cache no block of {cfg.block_size} tokens; "
                          "give it at least 1 (or leave it out to size the cache by --kv-cache-memory).")
    return -(-tokens // cfg.block_size)


def kv_budget_blocks(cfg: EngineConfig, budget: int, block_bytes: int) -> int:
    """The blocks `budget` bytes of KV cache hold (cfg.kv_cache_memory, or the device's default);
    ConfigError naming the setting when they hold none."""
    blocks = budget // block_bytes
    if blocks < 1:
        what = (f"--kv-cache-memory {format_size(budget)}" if cfg.kv_cache_memory is not None
                else f"The default KV cache budget of {format_size(budget)}")
        raise ConfigError(
            f"{what} holds no KV cache block of {cfg.block_size} tokens ({format_size(block_bytes)} each for this "
            f"model and dtype); raise --kv-cache-memory to at least {format_size(block_bytes, up=True)}."
        )
    return blocks


def kv_block_bytes(model_cfg: ModelConfig, element_size: int, block_size: int) -> int:
    """Bytes of one KV cache block: K and V of `block_size` tokens over every layer."""
    return model_cfg.kv_bytes_per_token * element_size * block_size


def check_engine_config(cfg: EngineConfig, model_cfg: ModelConfig) -> None:
    """ConfigError for what the engine would refuse as it starts, found from the settings and
    config.json alone: --attention-backend triton without CUDA, and a --kv-cache-tokens or
    --kv-cache-memory that holds no KV cache block (the default budgets are known only once the model
    has loaded: they are checked then)."""
    needs_device = cfg.attention_backend == "triton" or cfg.kv_cache_memory is not None
    if not needs_device:
        kv_token_cap_blocks(cfg)
        return
    from engine.model_runner import resolve_device, resolve_dtype  # imports torch: only when a check needs it

    device = resolve_device(cfg.device)
    check_attention_backend(cfg.attention_backend, device.type)
    kv_token_cap_blocks(cfg)
    if cfg.kv_cache_memory is not None:
        element = resolve_dtype(cfg.dtype, device, model_cfg.torch_dtype).itemsize
        kv_budget_blocks(cfg, cfg.kv_cache_memory, kv_block_bytes(model_cfg, element, cfg.block_size))


def format_size(n: int, up: bool = False) -> str:
    """Bytes as --kv-cache-memory takes them (KiB, MiB, GiB); `up`: rounded up, for a least size."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            tenths = -(-n * 10 // scale) if up else n * 10 // scale
            return f"{tenths / 10:.1f}{unit}"
    return f"{n} bytes" if n != 1 else "1 byte"
