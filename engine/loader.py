"""Build a model from a Hugging Face directory: config.json + single or sharded safetensors."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError
from engine.model_config import ModelConfig
from engine.models.decoder import DecoderForCausalLM

# Hugging Face projection name -> (our fused projection, which part)
_FUSED_PARTS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"No *.safetensors weights in {model_dir}; batchllm loads safetensors only "
            "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))."
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"Weight files listed in the index are missing: {', '.join(missing)}.")
    return files


def _fused_rows(cfg: ModelConfig, fused: str, part: int) -> tuple[int, int]:
    if fused == "qkv_proj":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        starts = (0, q, q + kv)
        sizes = (q, kv, kv)
        return starts[part], sizes[part]
    return part * cfg.intermediate_size, cfg.intermediate_size


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextmanager
def _uninitialized(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules built straight on `device` in `dtype`, their random init skipped: the weights are
    loaded over them. (Building on the meta device and moving with to_empty would run meta kernels
    that import torch._dynamo and sympy: seconds of a short job's start.)"""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    saved_dtype = torch.get_default_dtype()

    def skip(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, skip)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(saved_dtype)
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_model(model_dir: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_positions: int) -> DecoderForCausalLM:
    with _uninitialized(device, dtype):
        model = DecoderForCausalLM(cfg)
    params = dict(model.named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                _load_tensor(cfg, params, filled, name, f.get_tensor(name))
    missing = [name for name, rows in filled.items() if rows < params[name].shape[0]]
    if missing:
        raise ModelLoadError(
            f"The weights in {model_dir} lack {len(missing)} tensors the {cfg.architecture} config needs "
            f"(e.g. {', '.join(missing[:3])}); the checkpoint does not match its config.json."
        )
    model.init_rope(max_positions)
    return model.eval()


def _load_tensor(cfg: ModelConfig, params: dict, filled: dict[str, int], name: str, tensor: torch.Tensor) -> None:
    parts = name.rsplit(".", 2)  # [..., projection, weight|bias]
    fused = _FUSED_PARTS.get(parts[-2]) if len(parts) == 3 else None
    if fused is not None:
        target = f"{parts[0]}.{fused[0]}.{parts[-1]}"
        start, size = _fused_rows(cfg, *fused)
    else:
        target, start, size = name, 0, None
    param = params.get(target)
    if param is None:
        raise ModelLoadError(f"Unexpected tensor '{name}' in the weights: it does not belong to a {cfg.architecture}.")
    dest = param.data if size is None else param.data[start : start + size]
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ModelLoadError(
            f"Tensor '{name}' has shape {tuple(tensor.shape)} but the config implies {tuple(dest.shape)}."
        )
    with torch.no_grad():
        dest.copy_(tensor)
    filled[target] += dest.shape[0] if dest.dim() else 1
