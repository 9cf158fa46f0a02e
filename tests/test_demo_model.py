"""The built-in demo model: deterministic, HF-loadable, race-safe, and not degenerate."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from engine import demo_model
from engine.demo_model import DEMO_MODEL_NAME, ensure_demo_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_hf_names(demo_model_dir: Path) -> None:
    from safetensors import safe_open

    assert demo_model_dir.name == DEMO_MODEL_NAME
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    gen = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"]
    with safe_open(str(demo_model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    layers = config["num_hidden_layers"]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    assert names == expected
    assert not list(demo_model_dir.parent.glob(f".{DEMO_MODEL_NAME}.tmp-*"))  # temp dir cleaned up


def test_deterministic_across_builds(demo_model_dir: Path, tmp_path: Path) -> None:
    other = ensure_demo_model(tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert _digest(other / name) == _digest(demo_model_dir / name), name


def test_reuses_existing_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    first = ensure_demo_model()
    assert first == tmp_path / "cache" / DEMO_MODEL_NAME
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def _build(root: str) -> str:
    return str(ensure_demo_model(Path(root)))


def test_concurrent_builds_agree(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_build, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    target = Path(paths[0])
    assert demo_model._is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_MODEL_NAME]


def test_tokenizer_loads_with_autotokenizer(demo_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir))
    assert len(tok) == demo_model.VOCAB_SIZE
    assert tok.bos_token_id == demo_model.BOS_ID and tok.eos_token_id == demo_model.EOS_ID
    text = "Héllo, wörld!\n\tend"
    ids = tok(text)["input_ids"]
    assert ids[0] == demo_model.BOS_ID and ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|begin_of_text|><|user|>\nhi") and chat.endswith("<|assistant|>\n")


@torch.no_grad()
def test_greedy_output_is_varied(demo_model_dir: Path) -> None:
    """Random weights can collapse to one repeated token; the demo must print something text-like."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir))
    model = LlamaForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    outputs = []
    for prompt in ("Classify the sentiment: I loved it.", "hello", "Summarize: the cat sat on the mat."):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=24, eos_token_id=None)
        new = out[0, ids.shape[1]:].tolist()
        assert len(set(new[8:])) >= 8, new  # no short cycle after a warm-up
        outputs.append(tuple(new))
    assert len(set(outputs)) == len(outputs)


@pytest.mark.parametrize("command", ["run", "render", "analyze"])
def test_an_unwritable_demo_model_cache_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """A cron job or service whose HOME (or BATCHLLM_CACHE_DIR) cannot hold the demo model: one line
    naming where and what to set, exit 2 (it was a traceback and exit 1)."""
    from reliability_utils import invoke, one_error_line

    not_a_dir = tmp_path / "afile"
    not_a_dir.write_text("")
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(not_a_dir / "cache"))
    inp = tmp_path / "in.csv"
    inp.write_text("id,text\n1,hello\n")
    tpl = tmp_path / "t.j2"
    tpl.write_text("Say: {{ text }}")
    args = {"run": ["run", str(inp), "-t", str(tpl), "-o", str(tmp_path / "out.csv")],
            "render": ["render", str(inp), "-t", str(tpl)], "analyze": ["analyze", str(inp), "-t", str(tpl)]}[command]
    result = invoke(args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert "Cannot write the demo model" in line and "BATCHLLM_CACHE_DIR" in line and str(not_a_dir) in line
    assert not (tmp_path / "out.csv").exists()
