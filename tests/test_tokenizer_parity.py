"""engine.tokenizer (the `tokenizers` library and jinja2, no transformers) gives exactly what
transformers' AutoTokenizer gives: token ids with and without special tokens, decoded text, chat
prompts, EOS ids and vocabulary size, on the tiny test models of every family and the demo model."""
from __future__ import annotations

from pathlib import Path

import pytest

import model_factory

TEXTS = [
    "",
    "The old engine repaired three apples (or so they said).",
    "  leading and trailing spaces   ",
    "runs   of    spaces\t\ttabs\n\n\nnewlines \r\n crlf",
    "Ünïcode: é vs e\u0301 (combining), 完璧, Ελληνικά, emoji 😀👍🏽, zero\u200bwidth",
    "<|begin_of_text|>special tokens <|user|>inside<|eot|> the text<|end_of_text|>",
    "almost special: <|user| > <|assistant|x <|eot|><|eot|>",
    "numbers 1234567890 3.14159 -42 1e10, punctuation!?;:'\"()[]{}",
    "x" * 300,
    "Say: r0 a",
]
FAMILY_MODELS = ["llama_gqa", "llama_mha", "qwen2", "qwen3"]

RICH_TEMPLATE = (
    "{%- set ns = namespace(turns=0) -%}"
    "{%- if messages[0]['role'] == 'system' %}{{ bos_token }}[SYS]{{ messages[0]['content'] | trim }}\n{% endif %}"
    "{%- for message in messages %}\n"
    "  {%- if message['role'] == 'system' %}{% continue %}{% endif %}\n"
    "  {%- if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}\n"
    "  {%- set ns.turns = ns.turns + 1 %}\n"
    "<{{ message['role'] }} n={{ ns.turns }}>{{ message['content'] }}{% if not loop.last %}{{ eos_token }}{% endif %}\n"
    "{%- endfor %}\n"
    "{{ dict(a=1, b='<&>') | tojson }} {{ messages | length }} {{ (messages | last)['content'] | tojson }}"
    "{%- if add_generation_prompt %}<assistant>{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "  be brief \n"}, {"role": "user", "content": "café <b>&</b> \"quoted\""},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again 😀"}],
]


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, demo_model_dir: Path) -> dict[str, Path]:
    dirs = {name: tiny_model_dir(name) for name in FAMILY_MODELS}
    dirs["demo"] = demo_model_dir
    return dirs


@pytest.mark.parametrize("name", [*FAMILY_MODELS, "demo"])
def test_tokenizer_matches_transformers(name: str, model_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from engine.tokenizer import Tokenizer

    model_dir = model_dirs[name]
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    ours = Tokenizer(model_dir)

    for special in (True, False):
        want = hf(TEXTS, add_special_tokens=special)["input_ids"]
        assert ours.encode_batch(TEXTS, add_special_tokens=special) == want
        tokens, lengths = ours.encode_batch_packed(TEXTS, add_special_tokens=special)
        assert tokens.tolist() == [t for ids in want for t in ids] and lengths.tolist() == [len(x) for x in want]
        for ids in want:
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == len(hf)
    assert hf.eos_token_id in ours.eos_token_ids
    assert ours.has_chat_template == (hf.chat_template is not None)
    if ours.has_chat_template:
        for text in TEXTS:
            messages = [{"role": "user", "content": text}]
            assert ours.apply_chat_template(text) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
            system = [{"role": "system", "content": "Be brief."}]  # --system
            assert ours.apply_chat_template(text, system="Be brief.") == hf.apply_chat_template(
                system + messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_semantics_match_transformers(generation_prompt: bool, model_dirs: dict[str, Path]) -> None:
    """Whitespace control (trim_blocks, lstrip_blocks), loop controls, namespace, dict, tojson without
    HTML escaping, special tokens as variables, raise_exception: rendered as transformers does."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    from engine.chat_template import render_chat
    from engine.tokenizer import Tokenizer

    model_dir = model_dirs["llama_gqa"]
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    ours = Tokenizer(model_dir)
    for messages in CONVERSATIONS:
        want = hf.apply_chat_template(messages, chat_template=RICH_TEMPLATE, tokenize=False,
                                      add_generation_prompt=generation_prompt)
        got = render_chat(RICH_TEMPLATE, messages, ours.special_tokens, add_generation_prompt=generation_prompt)
        assert got == want
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(TemplateError, match="bad role tool"):
        render_chat(RICH_TEMPLATE, bad, ours.special_tokens, add_generation_prompt=True)


def test_tokenizer_json_variants_match_transformers(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    """add_bos_token/add_eos_token in tokenizer_config.json, a tokenizer.json without post-processor,
    with truncation and padding, a special token missing from the vocabulary: as transformers."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from engine.tokenizer import Tokenizer

    cases = {
        "flags-off": ({"add_bos_token": False}, {}),
        "flags-on": ({"add_bos_token": True, "add_eos_token": True}, {}),
        "no-post-processor": ({"add_bos_token": True}, {"post_processor": None}),
        "truncation-padding": ({}, {"truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst",
                                                   "stride": 0},
                                    "padding": {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                                                "pad_id": 1, "pad_type_id": 0, "pad_token": "<|end_of_text|>"}}),
        "new-special-token": ({"mask_token": "<|mask|>"}, {}),
    }
    for name, (config_change, json_change) in cases.items():
        d = tmp_path / name
        shutil.copytree(model_dirs["llama_gqa"], d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, **config_change}))
        spec = json.loads((d / "tokenizer.json").read_text())
        (d / "tokenizer.json").write_text(json.dumps({**spec, **json_change}))
        hf, ours = AutoTokenizer.from_pretrained(str(d)), Tokenizer(d)
        texts = [*TEXTS, "a <|mask|> b"]
        assert ours.encode_batch(texts) == hf(texts)["input_ids"], name
        assert ours.vocab_size == len(hf), name


def test_run_path_imports_no_transformers(model_dirs: dict[str, Path]) -> None:
    """Loading a tokenizer and rendering a chat prompt never imports transformers (seconds of start-up)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom engine.tokenizer import Tokenizer\n"
        f"t = Tokenizer({str(model_dirs['llama_gqa'])!r})\n"
        "t.encode(t.apply_chat_template('hi')); t.decode([1, 2, 3])\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
