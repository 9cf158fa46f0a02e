"""A model's weight files and their safetensors headers, read and checked without torch or the weights.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name -> dtype,
shape, [begin, end) byte offsets into the data that follows), then the data. A truncated download, an
empty file or some other file renamed `.safetensors` fails one of the checks here with a sentence
naming the file, before a run has created anything, instead of deep inside the loader.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError

# Bytes per element of every dtype the safetensors format defines.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too
_FIX = "download or convert the model again"


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A PEFT (LoRA) adapter saved beside its base model: never part of the model's weights.
_NOT_WEIGHTS = frozenset({"adapter_model.safetensors"})


def weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files, as transformers picks them: those its index names; else
    model.safetensors alone (a stale model_old.safetensors beside it must not override it); else
    every *.safetensors in the directory (check_weights then refuses a tensor found in two of them).
    The loader reads these files and the job fingerprint identifies the model by them."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:  # ValueError: bad JSON or UTF-8, huge integers
            raise ModelLoadError(f"{index} is not a readable safetensors index ({exc}); {_FIX}.") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index} has no weight_map of tensor names to file names; {_FIX}.")
        files = sorted({model_dir / name for name in weight_map.values()})
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        files = sorted(p for p in model_dir.glob("*.safetensors") if p.name not in _NOT_WEIGHTS)
    if not files:
        raise ModelLoadError(
            f"No *.safetensors weights in {model_dir}; batchllm loads safetensors only "
            "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))."
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"Weight files listed in the index are missing: {', '.join(missing)}.")
    return files


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> dtype and shape, after checking that the header is well formed and that the
    tensors' byte ranges tile the data exactly (what the safetensors library checks when it opens)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= min(MAX_HEADER_BYTES, size - 8) else b""
    except OSError as exc:
        raise ModelLoadError(f"Cannot read {path}: {exc}.") from exc
    if n < 0:
        raise ModelLoadError(f"{path} is not a safetensors file: it has {size} bytes, too few for a header; {_FIX}.")
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise ModelLoadError(
            f"{path} is truncated or not a safetensors file: its header length is {n} bytes but the file "
            f"has {size} bytes; {_FIX}."
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError:  # bad UTF-8 or JSON, or an integer past Python's digit limit
        header = None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a safetensors file: its header is not a JSON object; {_FIX}.")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensor, begin, end = _entry(path, name, entry)
        tensors[name] = tensor
        ranges.append((begin, end, name))
    ranges.sort()
    covered = 0
    for begin, end, name in ranges:
        if begin != covered:
            raise ModelLoadError(f"{path} is corrupt: tensor {name!r} starts at byte {begin}, expected {covered}; {_FIX}.")
        covered = end
    if covered != data_bytes:
        state = "truncated" if covered > data_bytes else "corrupt"
        raise ModelLoadError(
            f"{path} is {state}: its tensors need {covered} bytes of data but the file holds {data_bytes}; {_FIX}."
        )
    return tensors


def _entry(path: Path, name: str, entry: object) -> tuple[TensorEntry, int, int]:
    bad = f"{path} is corrupt: the header entry of tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelLoadError(f"{bad} is not an object; {_FIX}.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise ModelLoadError(f"{bad} has an unknown dtype {dtype!r}; {_FIX}.")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ModelLoadError(f"{bad} has no valid shape; {_FIX}.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise ModelLoadError(f"{bad} has no valid data_offsets; {_FIX}.")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ModelLoadError(f"{bad}: its byte range does not match its shape {shape} and dtype {dtype}; {_FIX}.")
    return TensorEntry(dtype, tuple(shape)), begin, end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
