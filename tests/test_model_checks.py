"""A broken model directory is refused before a run writes anything: exit 2, one line naming the file at
fault (not a traceback, not the tokenizer), no output, run directory or manifest; and once the file is
fixed the same command runs. `analyze` needs no weights, and refuses the same broken config or chat
template. A config.json value out of range (a RoPE base, epsilon, scaling factor or multiplier that is
NaN, infinite, 0 or negative) is refused naming the key, not run into NaN logits."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine.errors import ModelLoadError
from engine.model_config import load_model_config
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


def _bad_value(key: str, **changes: object) -> Callable[[Path], str]:
    """A config.json edit whose error must name the file and `key`."""
    edit = _edit_config(**changes)

    def bad(model: Path) -> str:
        edit(model)
        return f"config.json: {key} "

    return bad


def _write(name: str, data: bytes, culprit: str | None = None) -> Callable[[Path], str]:
    """Writes `data` to the model's file `name`; the error must name `culprit` (default: the file)."""
    def edit(model: Path) -> str:
        (model / name).write_bytes(data)
        return culprit or name

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
    # past Python's 4,300-digit limit for int(): json raises a plain ValueError, not a JSONDecodeError
    "config_number_too_long": _write("config.json", b'{"hidden_size": 1' + b"0" * 5000 + b"}"),
    "weights_index_not_json": _write("model.safetensors.index.json", b'{"weight_map": '),
    "config_string_number": _edit_config(hidden_size="256"),
    "config_missing_key": _edit_config(num_hidden_layers=None),
    "heads_do_not_divide_hidden": _edit_config(num_attention_heads=6, num_key_value_heads=3, head_dim=None),
    "sliding_window_not_a_number": _edit_config(architectures=["MistralForCausalLM"], sliding_window="4096"),
    "rope_theta_negative": _bad_value("rope_theta", rope_theta=-1),
    "rope_theta_nan": _bad_value("rope_theta", rope_theta=float("nan")),
    "rms_norm_eps_zero": _bad_value("rms_norm_eps", rms_norm_eps=0),
    "rope_scaling_factor_zero": _bad_value("factor", rope_scaling={"rope_type": "linear", "factor": 0}),
    "chat_template_syntax_error": _write("chat_template.jinja", b"{% for m in messages %}{{ m.content }"),
    "generation_config_empty": _write("generation_config.json", b"", "generation_config.json is not readable JSON"),
    "generation_eos_not_ids": _write("generation_config.json", b'{"eos_token_id": ["</s>"]}',
                                     "generation_config.json: eos_token_id is ['</s>']"),
    "config_eos_not_ids": _bad_value("eos_token_id", eos_token_id="</s>"),
    "text_config_not_an_object": _bad_value("text_config", text_config=[1]),
}
# Weights are not needed by analyze: it must not refuse these.
WEIGHTS_ONLY = {"weights_index_not_json", "empty_weights", "garbage_weights", "truncated_weights", "header_past_the_end", "missing_tensor",
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


def test_null_text_config_is_no_text_config(job: tuple[Path, Path, Path]) -> None:
    # as transformers reads it: a text-only config.json may say "text_config": null
    model, inp, tpl = job
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "text_config": None}))
    result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(inp.parent / "out.csv"), "--model", str(model), *FAST])
    assert result.exit_code == 0, result.output


def test_broken_tokenizer_config_is_named(job: tuple[Path, Path, Path]) -> None:
    model, inp, tpl = job
    (model / "tokenizer_config.json").write_text('{"bos_token": ')
    result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(inp.parent / "out.csv"), "--model", str(model), *FAST])
    assert result.exit_code == 2, result.output
    assert "tokenizer_config.json is not readable JSON" in one_error_line(result.stderr)


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


# config.json bases over the demo model's (Llama, transformers-4 keys), one per way a family reads its
# numbers; each loads as it is (test_config_value_out_of_range_is_refused checks that first)
_V5_ROPE = {"rope_theta": None, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
_LLAMA3 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32}}
_LONGROPE = {"architectures": ["Phi3ForCausalLM"], "original_max_position_embeddings": 1024,
             "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}}
_GRANITE = {"architectures": ["GraniteForCausalLM"], "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
            "attention_multiplier": 0.0078125, "logits_scaling": 8.0}
_GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "query_pre_attn_scalar": 32, "attn_logit_softcapping": 50.0,
           "final_logit_softcapping": 30.0}
_GEMMA3 = {"architectures": ["Gemma3ForCausalLM"], "rope_local_base_freq": 1e4, "rope_scaling": None}
_GEMMA3_V5 = {"architectures": ["Gemma3ForCausalLM"], "rope_theta": None, "rope_scaling": None,
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
NAN, INF = float("nan"), float("inf")


def _nested(base: dict, key: str, value: object, *path: str) -> dict:
    """`base` with base[path...][key] = value (a copy)."""
    edited = json.loads(json.dumps(base))
    inner = edited
    for step in path:
        inner = inner[step]
    inner[key] = value
    return edited


def _list_with(value: float) -> list[float]:
    return [1.0] * 15 + [value]


# (base, the edit, the key the error must name)
OUT_OF_RANGE: dict[str, tuple[dict, dict, str]] = {
    "rope_theta_negative": ({}, {"rope_theta": -1}, "rope_theta"),
    "rope_theta_zero": ({}, {"rope_theta": 0}, "rope_theta"),
    "rope_theta_nan": ({}, {"rope_theta": NAN}, "rope_theta"),
    "rope_theta_infinite": ({}, {"rope_theta": INF}, "rope_theta"),
    "rope_parameters_theta_negative": (_V5_ROPE, _nested(_V5_ROPE, "rope_theta", -1, "rope_parameters"), "rope_theta"),
    "rope_parameters_theta_nan": (_V5_ROPE, _nested(_V5_ROPE, "rope_theta", NAN, "rope_parameters"), "rope_theta"),
    "rms_norm_eps_negative": ({}, {"rms_norm_eps": -1}, "rms_norm_eps"),
    "rms_norm_eps_zero": ({}, {"rms_norm_eps": 0}, "rms_norm_eps"),
    "rms_norm_eps_nan": ({}, {"rms_norm_eps": NAN}, "rms_norm_eps"),
    "linear_factor_zero": ({}, {"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    "linear_factor_negative": ({}, {"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "factor"),
    "linear_factor_nan_old_type_key": ({}, {"rope_scaling": {"type": "linear", "factor": NAN}}, "factor"),
    "llama3_factor_zero": (_LLAMA3, _nested(_LLAMA3, "factor", 0, "rope_scaling"), "factor"),
    "llama3_low_freq_factor_zero": (_LLAMA3, _nested(_LLAMA3, "low_freq_factor", 0, "rope_scaling"), "low_freq_factor"),
    "llama3_high_freq_factor_negative": (_LLAMA3, _nested(_LLAMA3, "high_freq_factor", -4, "rope_scaling"),
                                         "high_freq_factor"),
    "llama3_original_positions_zero": (_LLAMA3, _nested(_LLAMA3, "original_max_position_embeddings", 0, "rope_scaling"),
                                       "original_max_position_embeddings"),
    "longrope_short_factor_zero": (_LONGROPE, _nested(_LONGROPE, "short_factor", _list_with(0), "rope_scaling"),
                                   "short_factor"),
    "longrope_long_factor_negative": (_LONGROPE, _nested(_LONGROPE, "long_factor", _list_with(-1), "rope_scaling"),
                                      "long_factor"),
    "longrope_long_factor_nan": (_LONGROPE, _nested(_LONGROPE, "long_factor", _list_with(NAN), "rope_scaling"),
                                 "long_factor"),
    "longrope_factor_negative": (_LONGROPE, _nested(_LONGROPE, "factor", -2.0, "rope_scaling"), "factor"),
    "longrope_original_positions_one": (_LONGROPE, {"original_max_position_embeddings": 1},
                                        "original_max_position_embeddings"),
    "longrope_attention_factor_zero": (_LONGROPE, _nested(_LONGROPE, "attention_factor", 0, "rope_scaling"),
                                       "attention_factor"),
    "granite_embedding_multiplier_zero": (_GRANITE, {"embedding_multiplier": 0}, "embedding_multiplier"),
    "granite_embedding_multiplier_infinite": (_GRANITE, {"embedding_multiplier": INF}, "embedding_multiplier"),
    "granite_residual_multiplier_zero": (_GRANITE, {"residual_multiplier": 0}, "residual_multiplier"),
    "granite_attention_multiplier_nan": (_GRANITE, {"attention_multiplier": NAN}, "attention_multiplier"),
    "granite_logits_scaling_zero": (_GRANITE, {"logits_scaling": 0}, "logits_scaling"),
    "granite_logits_scaling_nan": (_GRANITE, {"logits_scaling": NAN}, "logits_scaling"),
    "gemma_attn_softcap_nan": (_GEMMA2, {"attn_logit_softcapping": NAN}, "attn_logit_softcapping"),
    "gemma_final_softcap_infinite": (_GEMMA2, {"final_logit_softcapping": INF}, "final_logit_softcapping"),
    "gemma_final_softcap_negative": (_GEMMA2, {"final_logit_softcapping": -30.0}, "final_logit_softcapping"),
    "gemma_query_pre_attn_scalar_nan": (_GEMMA2, {"query_pre_attn_scalar": NAN}, "query_pre_attn_scalar"),
    "gemma_query_pre_attn_scalar_zero": (_GEMMA2, {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
    "gemma3_rope_local_base_freq_zero": (_GEMMA3, {"rope_local_base_freq": 0}, "rope_local_base_freq"),
    "gemma3_sliding_rope_theta_negative": (
        _GEMMA3_V5, _nested(_GEMMA3_V5, "rope_theta", -1, "rope_parameters", "sliding_attention"), "rope_theta"),
    "gemma3_full_factor_zero": (_GEMMA3_V5, _nested(_GEMMA3_V5, "factor", 0, "rope_parameters", "full_attention"),
                                "factor"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_config_value_out_of_range_is_refused(case: str, tmp_path: Path, demo_model_dir: Path) -> None:
    # config.json alone: load_model_config reads nothing else (check_model_files calls it before any
    # weight file is opened; the CLI cases in BROKEN show the exit 2 and that nothing is written)
    base, edit, key = OUT_OF_RANGE[case]
    shutil.copy(demo_model_dir / "config.json", tmp_path / "config.json")
    _edit_config(**base)(tmp_path)
    load_model_config(tmp_path)  # the base is a config batchllm runs
    _edit_config(**edit)(tmp_path)
    with pytest.raises(ModelLoadError) as refused:
        load_model_config(tmp_path)
    message = str(refused.value)
    assert f"config.json: {key} " in message and message.endswith("fix config.json (or download the model again).")
    assert "\n" not in message
