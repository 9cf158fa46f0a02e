"""Build a model from a Hugging Face directory: config.json + single or sharded safetensors.

`check_weights` answers "would `load_model` succeed?" from the safetensors headers alone (names,
shapes, byte ranges) against a model built on the meta device: no weight is read.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError
from engine.model_config import ModelConfig
from engine.models.decoder import DecoderForCausalLM
from engine.safetensors_header import read_header, weight_files

# Hugging Face projection name -> (our fused projection, which part). Checkpoints that are fused
# already (Phi-3's qkv_proj, gate_up_proj: q|k|v and gate|up rows, our order) load as they are.
_FUSED_PARTS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# One expert's projection in a Qwen3-MoE (mlp.experts.E.gate_proj) or Mixtral (block_sparse_moe.experts.E.w1:
# gate, w3: up, w2: down) checkpoint -> a slice of our stacked experts.gate_up_proj / experts.down_proj.
_EXPERT = re.compile(r"(?P<layer>.*\.)(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
                     r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_EXPERT_PARTS = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1}  # the rest are down projections


def _fused_rows(cfg: ModelConfig, fused: str, part: int) -> tuple[int, int]:
    if fused == "qkv_proj":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        starts = (0, q, q + kv)
        sizes = (q, kv, kv)
        return starts[part], sizes[part]
    return part * cfg.intermediate_size, cfg.intermediate_size


def check_weights(model_dir: Path, cfg: ModelConfig) -> None:
    """ModelLoadError naming the file and tensor when the weights are unreadable or do not fit `cfg`."""
    # Init skipped: meta kernels for the random init import torch._dynamo (seconds of a short job).
    with _uninitialized(torch.device("meta"), torch.get_default_dtype()):
        params = dict(DecoderForCausalLM(cfg).named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}
    sources: dict[str, Path] = {}
    for path in weight_files(model_dir):
        for name, entry in read_header(path).items():
            _claim(sources, name, path)
            if _wanted(cfg, name):
                _place(cfg, params, filled, name, entry.shape, path)
    _check_complete(model_dir, cfg, params, filled)


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
    sources: dict[str, Path] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                _claim(sources, name, path)
                if not _wanted(cfg, name):
                    continue
                tensor = f.get_tensor(name)
                with torch.no_grad():
                    _place(cfg, params, filled, name, tuple(tensor.shape), path).copy_(tensor)
    _check_complete(model_dir, cfg, params, filled)
    model.init_rope(max_positions)
    return model.eval()


def _claim(sources: dict[str, Path], name: str, path: Path) -> None:
    """Records that tensor `name` comes from `path`; a name in two files would silently take the
    later file's values (a stale copy of the weights overriding the model's)."""
    first = sources.setdefault(name, path)
    if first != path:
        raise ModelLoadError(
            f"Tensor '{name}' is in both {first} and {path}; remove the file that is not part of the model "
            "(or add the model's model.safetensors.index.json)."
        )


def _wanted(cfg: ModelConfig, name: str) -> bool:
    return not name.endswith(_IGNORED_SUFFIXES) and not (name == "lm_head.weight" and cfg.tie_word_embeddings)


def _check_complete(model_dir: Path, cfg: ModelConfig, params: dict, filled: dict[str, int]) -> None:
    missing = [name for name, count in filled.items() if count < params[name].numel()]
    if missing:
        raise ModelLoadError(
            f"The weights in {model_dir} lack {len(missing)} tensors the {cfg.architecture} config needs "
            f"(e.g. {', '.join(missing[:3])}); the checkpoint does not match its config.json."
        )


def _place(
    cfg: ModelConfig, params: dict, filled: dict[str, int], name: str, shape: tuple[int, ...], path: Path
) -> torch.Tensor:
    """The view of our parameter that tensor `name` fills (its elements counted in `filled`)."""
    expert = _EXPERT.fullmatch(name)
    if expert is not None:
        return _place_expert(cfg, params, filled, name, expert, shape, path)
    parts = name.rsplit(".", 2)  # [..., projection, weight|bias]
    fused = _FUSED_PARTS.get(parts[-2]) if len(parts) == 3 else None
    if fused is not None:
        target = f"{parts[0]}.{fused[0]}.{parts[-1]}"
        start, size = _fused_rows(cfg, *fused)
    else:  # Mixtral's router is block_sparse_moe.gate, ours mlp.gate
        target, start, size = name.replace(".block_sparse_moe.", ".mlp."), 0, None
    param = _param(cfg, params, target, name, path)
    return _filled(filled, target, param.data if size is None else param.data[start : start + size], name, shape, path)


def _place_expert(cfg: ModelConfig, params: dict, filled: dict[str, int], name: str, match: re.Match,
                  shape: tuple[int, ...], path: Path) -> torch.Tensor:
    part = _EXPERT_PARTS.get(match["proj"])
    target = f"{match['layer']}mlp.experts.{'down_proj' if part is None else 'gate_up_proj'}"
    param = _param(cfg, params, target, name, path)
    expert = int(match["expert"])
    if expert >= param.shape[0]:
        raise ModelLoadError(
            f"Unexpected tensor '{name}' in {path}: the config has {param.shape[0]} experts; the checkpoint "
            "does not match its config.json."
        )
    dest = param.data[expert]
    if part is not None:
        size = dest.shape[0] // 2
        dest = dest[part * size : (part + 1) * size]
    return _filled(filled, target, dest, name, shape, path)


def _param(cfg: ModelConfig, params: dict, target: str, name: str, path: Path) -> torch.nn.Parameter:
    param = params.get(target)
    if param is None:
        raise ModelLoadError(
            f"Unexpected tensor '{name}' in {path}: it does not belong to a {cfg.architecture}; the "
            "checkpoint does not match its config.json."
        )
    return param


def _filled(filled: dict[str, int], target: str, dest: torch.Tensor, name: str, shape: tuple[int, ...],
            path: Path) -> torch.Tensor:
    if tuple(dest.shape) != tuple(shape):
        raise ModelLoadError(
            f"Tensor '{name}' in {path} has shape {tuple(shape)} but the config implies {tuple(dest.shape)}; "
            "the checkpoint does not match its config.json."
        )
    filled[target] += dest.numel()
    return dest
