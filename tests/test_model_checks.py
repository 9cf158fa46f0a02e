"""A broken model directory is refused before a run writes anything: exit 2, one line naming the file at
fault (not a traceback, not the tokenizer), no output, run directory or manifest; and once the file is
fixed the same command runs. `analyze` needs no weights, and refuses the same broken config or chat
template."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reliability_utils import FAST, invoke, one_error_line, snapshot, write_rows_csv, write_template


def _edit_config(**changes: object) -> Callable[[Path], str]:
    def edit(model: Path) -> str:
        path = model / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
        return "config.json"

    return edit


def _write(name: str, data: bytes) -> Callable[[Path], str]:
    def edit(model: Path) -> str:
        (model / name).write_bytes(data)
        return name

    return edit


def _truncate(model: Path) -> str:
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "model.safetensors"


def _header_lies(model: Path) -> str:
    # A well-formed header whose last tensor claims one more row than the file holds data for.
    path = model / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    entry = header[name]
    row_bytes = (entry["data_offsets"][1] - entry["data_offsets"][0]) // entry["shape"][0]
    entry["shape"][0] += 1
    entry["data_offsets"][1] += row_bytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return "model.safetensors is truncated"


def _drop_tensor(model: Path) -> str:
    path = model / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(path))
    return "down_proj"


def _wrong_shape(model: Path) -> str:
    path = model / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"] = np.ones(7, dtype=np.float32)
    save_file(tensors, str(path))
    return "model.norm.weight"


def _no_weights(model: Path) -> str:
    (model / "model.safetensors").unlink()
    return "safetensors"


BROKEN: dict[str, Callable[[Path], str]] = {
    "empty_weights": _write("model.safetensors", b""),
    "garbage_weights": _write("model.safetensors", bytes(range(256)) * 40),
    "truncated_weights": _truncate,
    "header_past_the_end": _header_lies,
    "missing_tensor": _drop_tensor,
    "wrong_tensor_shape": _wrong_shape,
    "no_weights": _no_weights,
    "config_not_json": _write("config.json", b'{"hidden_size": 256,'),
    "config_not_an_object": _write("config.json", b"[1, 2]"),
    "config_string_number": _edit_config(hidden_size="256"),
    "config_missing_key": _edit_config(num_hidden_layers=None),
    "heads_do_not_divide_hidden": _edit_config(num_attention_heads=6, num_key_value_heads=3, head_dim=None),
    "sliding_window_not_a_number": _edit_config(architectures=["MistralForCausalLM"], sliding_window="4096"),
    "chat_template_syntax_error": _write("chat_template.jinja", b"{% for m in messages %}{{ m.content }"),
}
# Weights are not needed by analyze: it must not refuse these.
WEIGHTS_ONLY = {"empty_weights", "garbage_weights", "truncated_weights", "header_past_the_end", "missing_tensor",
                "wrong_tensor_shape", "no_weights"}


@pytest.fixture
def job(tmp_path: Path, demo_model_dir: Path) -> tuple[Path, Path, Path]:
    """(a private copy of the demo model, the input, the template) under tmp_path/job."""
    work = tmp_path / "job"
    work.mkdir()
    model = shutil.copytree(demo_model_dir, tmp_path / "model")
    return model, write_rows_csv(work / "in.csv", 3), write_template(work / "t.j2")


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_model_dir_is_refused_before_anything_is_written(case: str, job: tuple[Path, Path, Path], demo_model_dir: Path) -> None:
    model, inp, tpl = job
    culprit = BROKEN[case](model)
    out = inp.parent / "out.csv"
    args = ["run", str(inp), "-t", str(tpl), "-o", str(out), "--model", str(model), *[a for a in FAST if a != "--no-chat"]]
    before = snapshot(inp.parent)
    result = invoke(args)
    assert result.exit_code == 2, result.output
    assert culprit in one_error_line(result.stderr)
    assert "tokenizer" not in one_error_line(result.stderr)
    assert snapshot(inp.parent) == before  # no output, no run directory, no manifest, no marker
    analyzed = invoke(["analyze", str(inp), "-t", str(tpl), "--model", str(model)])
    if case in WEIGHTS_ONLY:
        assert analyzed.exit_code == 0, analyzed.output
    else:
        assert analyzed.exit_code == 2 and culprit in one_error_line(analyzed.stderr)
    # The corrected model directory: the same command runs.
    shutil.rmtree(model)
    shutil.copytree(demo_model_dir, model)
    fixed = invoke(args)
    assert fixed.exit_code == 0, fixed.output
    assert out.is_file()


def test_broken_chat_template_is_not_needed_with_no_chat(job: tuple[Path, Path, Path]) -> None:
    model, inp, tpl = job
    BROKEN["chat_template_syntax_error"](model)
    out = inp.parent / "out.csv"
    result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(out), "--model", str(model), *FAST])
    assert result.exit_code == 0, result.output  # FAST has --no-chat


def test_device_cuda_without_cuda_is_refused_before_anything_is_written(job: tuple[Path, Path, Path]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    model, inp, tpl = job
    out = inp.parent / "out.csv"
    args = ["run", str(inp), "-t", str(tpl), "-o", str(out), "--model", str(model), *FAST]
    before = snapshot(inp.parent)
    result = invoke([*args, "--device", "cuda"])
    assert result.exit_code == 2
    assert "--device cpu" in one_error_line(result.stderr)
    assert snapshot(inp.parent) == before
    assert invoke([*args, "--device", "cpu"]).exit_code == 0  # not refused as "a different job" (exit 4)
