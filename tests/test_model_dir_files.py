"""Which files of a model directory count, and what their odd contents do to a run: a token the
tokenizer adds past the model's vocabulary fails its rows only; stale or foreign safetensors files
beside the weights never override them."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from batchllm_cli.fingerprint import model_files_digest
from engine.errors import ModelLoadError
from engine.loader import check_weights, load_model
from engine.model_config import load_model_config
from reliability_utils import FAST, invoke, one_error_line, read_jsonl, read_rows, write_template

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model(tmp_path: Path, demo_model_dir: Path) -> Path:
    """A private copy of the demo model."""
    return Path(shutil.copytree(demo_model_dir, tmp_path / "model"))


def _write_csv(path: Path, texts: list[str]) -> Path:
    path.write_text("id,text\n" + "".join(f"{i},{text}\n" for i, text in enumerate(texts, 1)), encoding="utf-8")
    return path


def test_token_past_the_model_vocabulary_fails_its_row_only(model: Path, tmp_path: Path) -> None:
    # A pad_token missing from tokenizer.json's vocabulary is added by the tokenizer after its last
    # token: id == config.json's vocab_size, one past the embedding's last row.
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = "[PAD]"
    config_path.write_text(json.dumps(config))
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    inp = _write_csv(tmp_path / "in.csv", ["hello there", "fill [PAD] here", "ok"])
    out = tmp_path / "out.csv"
    args = ["run", str(inp), "-t", str(write_template(tmp_path / "t.j2", "{{ text }}")), "-o", str(out),
            "--model", str(model), *FAST]
    result = invoke(args)
    assert result.exit_code == 3, result.output
    # said once before any row runs
    assert f"1 token(s) past the model's vocabulary of {vocab_size} (config.json vocab_size), e.g. '[PAD]'" in result.stderr
    rows = read_rows(out)
    assert [row["response_finish_reason"] for row in rows] == ["length", "error", "length"]
    error = rows[1]["response_error"]
    assert f"token id {vocab_size} ('[PAD]'), past the model's vocabulary of {vocab_size}" in error
    assert "fix the tokenizer files" in error
    assert [e["row"] for e in read_jsonl(out.with_name(out.name + ".errors.jsonl"))] == [1]


def _loaded_embedding(model: Path) -> np.ndarray:
    cfg = load_model_config(model)
    loaded = load_model(model, cfg, torch.device("cpu"), torch.float32, 64)
    return loaded.state_dict()["model.embed_tokens.weight"].numpy()


def test_stale_or_adapter_safetensors_beside_model_safetensors_are_not_loaded(model: Path) -> None:
    weights = load_file(str(model / "model.safetensors"))
    digest = model_files_digest(model)
    # sorted after model.safetensors: loading every file would let it override the model's weights
    save_file({name: np.ones_like(t) for name, t in weights.items()}, str(model / "model_old.safetensors"))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 8), np.float32)},
              str(model / "adapter_model.safetensors"))
    check_weights(model, load_model_config(model))
    np.testing.assert_array_equal(_loaded_embedding(model), weights["model.embed_tokens.weight"])
    # the job's model identity covers the files the loader reads, and only those
    assert model_files_digest(model) == digest
    save_file({**weights, "extra": np.zeros(1, np.float32)}, str(model / "model.safetensors"))
    assert model_files_digest(model) != digest


def _split_weights(model: Path) -> list[str]:
    """model.safetensors as two shards without an index; their tensor names."""
    weights = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    save_file({n: weights[n] for n in names[::2]}, str(model / "part-a.safetensors"))
    save_file({n: weights[n] for n in names[1::2]}, str(model / "part-b.safetensors"))
    return names


def test_shards_without_an_index_load_but_a_tensor_in_two_files_is_refused(model: Path, tmp_path: Path) -> None:
    names = _split_weights(model)
    save_file({"base_model.model.lm_head.lora_B.weight": np.ones((4, 8), np.float32)},
              str(model / "adapter_model.safetensors"))
    inp = _write_csv(tmp_path / "in.csv", ["hello there", "ok"])
    tpl = write_template(tmp_path / "t.j2", "{{ text }}")
    args = ["run", str(inp), "-t", str(tpl), "-o", str(tmp_path / "out.csv"), "--model", str(model), *FAST]
    assert invoke(args).exit_code == 0
    stale = load_file(str(model / "part-a.safetensors"))
    save_file({names[0]: stale[names[0]]}, str(model / "part-c.safetensors"))
    with pytest.raises(ModelLoadError, match="is in both"):
        load_model(model, load_model_config(model), torch.device("cpu"), torch.float32, 64)
    refused = invoke(args)
    assert refused.exit_code == 2, refused.output
    line = one_error_line(refused.stderr)
    assert f"Tensor '{names[0]}' is in both {model / 'part-a.safetensors'} and {model / 'part-c.safetensors'}" in line


def _run_args(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    inp = _write_csv(tmp_path / "in.csv", ["hello there", "ok"])
    tpl = write_template(tmp_path / "t.j2", "{{ text }}")
    return ["run", str(inp), "-t", str(tpl), "-o", str(tmp_path / "out.csv"), "--model", str(model),
            *[a for a in FAST if a != "--no-chat"], *extra]


def test_no_tokenizer_files_says_to_copy_them(model: Path, tmp_path: Path) -> None:
    (model / "tokenizer.json").unlink()
    result = invoke(_run_args(model, tmp_path))
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == (
        f"error: The model directory {model} has no tokenizer (tokenizer.json, or tokenizer.model with the "
        "sentencepiece package); copy the tokenizer files from the model's repository.")


def test_sentencepiece_tokenizer_without_the_package_says_to_install_it(model: Path, tmp_path: Path) -> None:
    if any(map(importlib.util.find_spec, ("sentencepiece", "tiktoken"))):
        pytest.skip("sentencepiece or tiktoken is installed here")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.model").write_bytes(bytes(range(256)))
    result = invoke(_run_args(model, tmp_path))
    assert result.exit_code == 2, result.output
    assert "pip install sentencepiece" in one_error_line(result.stderr)
    # With a vocab.json as well, transformers is asked. Its warnings (several lines, written by its own
    # logging handler) are not shown: a real process, at transformers' default verbosity (conftest
    # lowers it for the tests' own process).
    (model / "vocab.json").write_text('{"a": 0}')
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    done = subprocess.run([sys.executable, "-m", "batchllm_cli", *_run_args(model, tmp_path)], capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 2, done.stderr
    assert one_error_line(done.stderr).startswith(f"error: Could not load a tokenizer from {model}: ")
    assert ".." not in done.stderr


def test_named_chat_templates_without_a_default_are_refused_unless_no_chat(model: Path, tmp_path: Path) -> None:
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ messages[0]['content'] }}"},
                               {"name": "rag", "template": "{{ messages[0]['content'] }}"}]
    config_path.write_text(json.dumps(config))
    for extra in ((), ("--chat",)):
        result = invoke(_run_args(model, tmp_path, *extra))
        assert result.exit_code == 2, result.output
        assert one_error_line(result.stderr) == (
            f"error: {config_path} has several chat templates ('tool_use', 'rag') and none named 'default'; "
            "add a \"default\" entry to its chat_template list, or run with --no-chat.")
    assert invoke(_run_args(model, tmp_path, "--no-chat")).exit_code == 0
