"""`batchllm analyze`: numbers checked against an independent count, JSON/HTML/text reports, exit codes."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import model_factory

runner = CliRunner()
ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}

# Real sharing at several levels: a system line, a language instruction (3 variants), one of four
# documents, then the row's question; some rows are exact duplicates, some share a question start.
TEMPLATE = (
    "System: you answer questions about documents.\n"
    "{% if lang == 'fr' %}Answer in French.{% elif lang == 'de' %}Answer in German.{% else %}Answer in English.{% endif %}\n"
    "Document: {{ doc }}\n"
    "Question: {{ question }}"
)
DOCS = [
    "The cat sat on the mat near the door and slept all afternoon.",
    "A small dog ran quickly across the green park after the ball.",
    "The old teacher wrote long letters to her friends every week.",
    "Our happy neighbour painted the garden fence blue on Tuesday.",
]
QUESTIONS = ["Who slept?", "Who slept where?", "What colour?", "When did it happen?", "Why?", "What ran?"]


def make_rows(n: int = 48, seed: int = 3) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append({
            "id": f"r{i:03d}",
            "lang": ["en", "fr", "de"][int(rng.integers(0, 3))],
            "doc": DOCS[int(rng.integers(0, len(DOCS)))],
            "question": QUESTIONS[int(rng.integers(0, len(QUESTIONS)))] + ("" if i % 5 else f" (case {i})"),
        })
    rows.append(dict(rows[0], id="dup0"))  # an exact duplicate prompt
    rows.append(dict(rows[1], id="dup1"))
    return rows


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer-only directory (byte-level BPE with a chat template, BOS added): no config.json."""
    out = tmp_path_factory.mktemp("tokenizer")
    model_factory.write_tokenizer(out, chat_template_file=False)
    return out


@pytest.fixture
def table(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "in.parquet", make_rows())


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "t.j2"
    path.write_text(TEMPLATE, encoding="utf-8")
    return path


def invoke(args: list[str]):  # noqa: ANN201 - click's Result
    from batchllm_cli.app import app

    return runner.invoke(app, ["analyze", *args], env=ENV)


def analyze_json(args: list[str]) -> dict[str, Any]:
    result = invoke([*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---- an independent count -------------------------------------------------------------------------


def independent_prompts(rows: list[dict[str, Any]], template_text: str, tok_dir: Path, chat: bool) -> list[list[int]]:
    """Render each row with plain jinja2 and tokenize with transformers itself (not batchllm's code)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    texts = []
    for row in rows:
        try:
            text = env.from_string(template_text).render(row)
        except Exception:  # noqa: BLE001 - rows that fail are not planned
            continue
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        texts.append(text)
    return [list(ids) for ids in tok(texts, add_special_tokens=not chat)["input_ids"]]


def naive_trie_nodes(seqs: list[list[int]]) -> int:
    root: dict = {}
    count = 0
    for s in seqs:
        node = root
        for t in s:
            if t not in node:
                node[t] = {}
                count += 1
            node = node[t]
    return count


@pytest.mark.parametrize("chat", [False, True])
def test_token_counts_match_an_independent_count(table: Path, template: Path, tok_dir: Path, chat: bool) -> None:
    rows = make_rows()
    seqs = independent_prompts(rows, TEMPLATE, tok_dir, chat)
    data = analyze_json([str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--chat" if chat else "--no-chat"])
    assert data["chat"] is chat
    assert data["rows"] == data["rows_planned"] == len(rows) and data["rows_failed"] == 0
    assert data["prompt_tokens"] == sum(len(s) for s in seqs)
    unique = naive_trie_nodes(seqs)
    assert data["unique_prompt_tokens"] == unique
    assert unique < data["prompt_tokens"] / 2  # the table really shares
    assert data["plan_prefill_tokens"] == data["optimum_prefill_tokens"] == unique
    assert data["sharing_ratio"] == pytest.approx(1 - unique / data["prompt_tokens"], abs=1e-6)
    assert data["max_prompt_tokens"] == max(len(s) for s in seqs)
    # Every other strategy computes at least the optimum, and no more than everything.
    for key in ("lru_prefill_tokens", "batchllm_prefill_tokens"):
        assert unique <= data[key] <= data["prompt_tokens"]


def test_json_keys_and_values(table: Path, template: Path, tok_dir: Path) -> None:
    data = analyze_json([str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--no-chat",
                         "--top", "3", "--block-size", "4", "--kv-cache-tokens", "64", "--max-tokens", "32"])
    for key in ("rows", "prompt_tokens", "unique_prompt_tokens", "sharing_ratio", "groups", "lru_prefill_tokens",
                "batchllm_prefill_tokens", "plan_prefill_tokens", "top_prefixes", "block_size", "kv_cache_tokens",
                "max_tokens", "group_sizes", "batchllm_groups", "rows_failed", "failures", "saved", "plan_mode"):
        assert key in data, key
    assert (data["block_size"], data["kv_cache_tokens"], data["max_tokens"]) == (4, 64, 32)
    assert isinstance(data["groups"], int) and data["groups"] == data["group_sizes"]["shared_groups"] >= 1
    sizes = data["group_sizes"]
    assert sizes["rows_in_shared_groups"] + sizes["plain_rows"] == data["rows_planned"]
    assert sum(h["groups"] for h in sizes["histogram"]) == sizes["shared_groups"]
    assert data["plan_mode"] == "in-memory"
    top = data["top_prefixes"]
    assert len(top) == 3
    assert [p["saved_tokens"] for p in top] == sorted((p["saved_tokens"] for p in top), reverse=True)
    rendered = {r["id"]: jinja2.Template(TEMPLATE).render(r) for r in make_rows()}
    ordered = list(rendered.values())
    for p in top:
        assert {"text", "rows", "tokens"} <= set(p)
        assert p["rows"] >= 2 and p["tokens"] >= p["new_tokens"] >= 1
        assert p["saved_tokens"] == (p["rows"] - 1) * p["new_tokens"]
        # The decoded text is how the example row's prompt starts (BOS is a special token, not text).
        assert ordered[p["example_row"]].startswith(p["text"]) and p["text"].endswith(p["new_text"])
        assert "example_id" not in p  # no --id-column
    assert top[0]["text"].startswith("System: you answer questions about documents.")
    assert data["saved"]["none"] == 0.0 and data["saved"]["plan"] == pytest.approx(data["sharing_ratio"], abs=1e-5)


def test_savings_of_all_shared_prefixes_add_up(table: Path, template: Path, tok_dir: Path) -> None:
    data = analyze_json([str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--no-chat", "--top", "100000"])
    assert sum(p["saved_tokens"] for p in data["top_prefixes"]) == data["prompt_tokens"] - data["unique_prompt_tokens"]


def test_out_of_core_gives_the_same_report(table: Path, template: Path, tok_dir: Path) -> None:
    args = [str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--no-chat", "--top", "5"]
    mem = analyze_json([*args, "--in-memory"])
    ooc = analyze_json([*args, "--out-of-core"])
    assert (mem["plan_mode"], ooc["plan_mode"]) == ("in-memory", "out-of-core")
    for d in (mem, ooc):
        for key in ("plan_mode", "tokenize_s", "lru_s", "plan_s", "report_s", "total_s"):
            d.pop(key)
    assert mem == ooc


def test_failed_rows_are_counted_not_fatal(tmp_path: Path, tok_dir: Path) -> None:
    rows = make_rows(12)
    rows[3]["question"] = None  # a null printed into the prompt
    rows[7]["lang"] = None  # fine: only compared, never printed
    table = write_parquet(tmp_path / "in.parquet", rows)
    tpl = tmp_path / "t.j2"
    tpl.write_text(TEMPLATE + "{{ 1 / (0 if id == 'r005' else 1) }}", encoding="utf-8")
    result = invoke([str(table), "-t", str(tpl), "--tokenizer", str(tok_dir), "--no-chat", "--id-column", "id", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows"] == 14 and data["rows_failed"] == 2 and data["rows_planned"] == 12
    assert data["failures"] == {"null_value": 1, "template_error": 1}
    assert [(e["row"], e["id"], e["kind"]) for e in data["first_errors"]] == [(3, "r003", "null_value"), (5, "r005", "template_error")]
    assert all("example_id" in p for p in data["top_prefixes"])
    assert "rows 12 of 14 in the input; 2 without a prompt" in " ".join(result.stderr.split())


def test_an_input_column_run_would_answer_into_is_named_and_the_table_still_analyzed(tmp_path: Path,
                                                                                    tok_dir: Path) -> None:
    """`run` refuses an input with a `response` column (its default answer column); analyze said nothing."""
    rows = [{**r, "Response": "old"} for r in make_rows(4)]
    table = write_parquet(tmp_path / "in.parquet", rows)
    tpl = tmp_path / "t.j2"
    tpl.write_text(TEMPLATE, encoding="utf-8")
    result = invoke([str(table), "-t", str(tpl), "--tokenizer", str(tok_dir), "--no-chat", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows_planned"] == len(rows)
    said = " ".join(result.stderr.split())
    assert "`run` with its default answer column would stop here" in said and "'Response'" in said, said


def test_context_limit_and_truncate_follow_run(tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo model (the default) has a 2048-token context: --max-tokens 2000 leaves 48 for a prompt.
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(demo_model_dir.parent))
    rows = [{"text": "short"}, {"text": "x" * 300}, {"text": "y" * 40}]
    table = write_parquet(tmp_path / "in.parquet", rows)
    tpl = tmp_path / "t.j2"
    tpl.write_text("{{ text }}", encoding="utf-8")
    base = [str(table), "-t", str(tpl), "--no-chat", "--max-tokens", "2000"]
    data = analyze_json(base)
    assert data["rows_failed"] == 1 and data["failures"] == {"prompt_too_long": 1}
    assert data["context_tokens"] == 2048
    cut = analyze_json([*base, "--truncate", "left"])
    assert cut["rows_failed"] == 0 and cut["rows_truncated"] == 1 and cut["max_prompt_tokens"] == 48


def test_empty_table(tmp_path: Path, template: Path, tok_dir: Path) -> None:
    table = tmp_path / "in.parquet"
    pq.write_table(pa.table({"lang": pa.array([], pa.string()), "doc": pa.array([], pa.string()),
                             "question": pa.array([], pa.string())}), table)
    data = analyze_json([str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--no-chat"])
    assert data["rows"] == data["prompt_tokens"] == data["unique_prompt_tokens"] == data["groups"] == 0
    assert data["top_prefixes"] == []


# ---- reports --------------------------------------------------------------------------------------


def test_text_report_has_the_comparison_table(table: Path, template: Path, tok_dir: Path) -> None:
    result = invoke([str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--no-chat", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    text = result.stderr
    lines = {}
    for key, label in (("prompt_tokens", "no sharing"), ("lru_prefill_tokens", "LRU prefix cache, table order"),
                       ("batchllm_prefill_tokens", "BatchLLM single-level plan"),
                       ("plan_prefill_tokens", "batchllm plan (ours)"), ("unique_prompt_tokens", "optimum")):
        line = next(ln for ln in text.splitlines() if ln.lstrip().startswith(label))
        assert f"{data[key]:,}" in line, line
        assert re.search(r"\d+\.\d%", line), line
        lines[key] = line
    assert "0.0%" in lines["prompt_tokens"]
    for phrase in ("rows", "prompt tokens", "unique prompt tokens", "sharing ratio", "groups", "shared prefixes"):
        assert phrase in text, phrase
    assert "System: you answer questions" in text  # the top prefix, decoded


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def test_html_report_is_self_contained_with_the_chart(table: Path, template: Path, tok_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = invoke([str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--no-chat", "--html", str(out), "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    page = out.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    parser = _Collect()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert tags.count("html") == 1 and "style" in tags
    assert not [a for t, a in parser.tags if t in ("link", "img", "iframe") or (t == "script" and a.get("src"))]
    svg = [a for t, a in parser.tags if t == "svg"]
    assert len(svg) == 1 and svg[0]["id"] == "icicle"
    nodes = [a for t, a in parser.tags if t == "rect" and a.get("class") == "node"]
    assert len(nodes) >= 5
    # Width = rows: the widest box is shared by every row and spans the chart.
    widths = sorted(float(a["width"]) for a in nodes)
    assert widths[-1] > 0.99 * 1100 - 1
    embedded = json.loads(next(s for s in parser.scripts if s.strip().startswith("[")))
    shown = [n for n in embedded if n["kind"] == "node"]
    assert max(n["rows"] for n in shown) == data["rows_planned"]
    assert any(n["text"].startswith("System: you answer") for n in shown)  # hover text is decoded text
    for number in (data["prompt_tokens"], data["unique_prompt_tokens"], data["lru_prefill_tokens"],
                   data["batchllm_prefill_tokens"]):
        assert f"{number:,}" in page


# ---- exit codes -----------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.demo_model
    import engine.tokenizer

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a usage error must be found before the model or tokenizer is touched")

    monkeypatch.setattr(engine.demo_model, "ensure_demo_model", forbidden)
    monkeypatch.setattr(engine.tokenizer.Tokenizer, "__init__", forbidden)


def assert_usage_error(result, *phrases: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.count("\n") == 0, message
    for phrase in phrases:
        assert phrase in message, message


def test_usage_errors_exit_2_before_any_work(no_model: None, table: Path, template: Path, tmp_path: Path) -> None:
    tok = str(tmp_path)
    assert_usage_error(invoke([str(tmp_path / "nope.csv"), "-t", str(template)]), "Input file not found")
    bad = tmp_path / "bad.j2"
    bad.write_text("{{ questoin }}", encoding="utf-8")
    assert_usage_error(invoke([str(table), "-t", str(bad)]), "questoin", "available columns")
    assert_usage_error(invoke([str(table), "-t", "nope"]), "neither a file nor a recipe")
    assert_usage_error(invoke([str(table), "-t", str(template), "--model", tok, "--tokenizer", tok]), "not both")
    assert_usage_error(invoke([str(table), "-t", str(template), "--tokenizer", str(tmp_path / "none")]), "not found")
    assert_usage_error(invoke([str(table), "-t", str(template), "--model", str(tmp_path / "none")]), "not found")
    assert_usage_error(invoke([str(table), "-t", str(template), "--json", str(tmp_path / "no" / "r.json")]), "--json")
    assert_usage_error(invoke([str(table), "-t", str(template), "--html", str(tmp_path)]), "--html")
    assert_usage_error(invoke([str(table), "-t", str(template), "--id-column", "lang"]), "duplicate")


def test_unloadable_tokenizer_is_a_usage_error(table: Path, template: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(invoke([str(table), "-t", str(template), "--tokenizer", str(empty)]), "tokenizer")


def test_help_documents_analyze() -> None:
    from batchllm_cli.app import app

    result = runner.invoke(app, ["analyze", "--help"], env=ENV)
    text = " ".join(result.output.split())
    for opt in ("--template", "--model", "--tokenizer", "--chat", "--no-chat", "--limit", "--id-column",
                "--block-size", "--kv-cache-tokens", "--max-tokens", "--top", "--json", "--html",
                "--out-of-core", "--in-memory", "Exit codes", "262144"):
        assert opt in text, opt


# ---- the packed tokenization path -----------------------------------------------------------------


def test_packed_encoding_equals_list_encoding(tok_dir: Path, tmp_path: Path) -> None:
    from engine.tokenizer import Tokenizer

    texts = ["Hello there, world.", "", "Ünïcode 完璧 😀 text", "The cat sat on the mat. " * 20]
    tok = Tokenizer(tok_dir)
    for special in (True, False):
        tokens, lengths = tok.encode_batch_packed(texts, add_special_tokens=special)
        assert tokens.dtype == np.int32 and lengths.dtype == np.int64
        lists = tok.encode_batch(texts, add_special_tokens=special)
        assert lengths.tolist() == [len(x) for x in lists]
        assert tokens.tolist() == [t for x in lists for t in x]
    # A tokenizer.json that turns on truncation: transformers' plain call ignores it, and so must we.
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (trunc / "tokenizer.json").write_text(json.dumps(spec))
    (trunc / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    tt = Tokenizer(trunc)
    tokens, lengths = tt.encode_batch_packed(texts)
    assert lengths.tolist() == [len(x) for x in tok.encode_batch(texts)]


def test_fit_packed_matches_fit_prompt() -> None:
    from batchllm_cli.prompts import FailedRow, PackedPrompts, PromptRow, fit_packed, fit_prompt

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 50, int(n)).tolist() for n in rng.integers(0, 12, 30)]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    packed = PackedPrompts(np.arange(30, dtype=np.int64) * 2, np.array([t for s in seqs for t in s], np.int32), lengths, [])
    for side in (None, "left", "right"):
        got, cut = fit_packed(packed, 6, side)
        want = [fit_prompt(PromptRow(2 * i, s), 6, side) for i, s in enumerate(seqs)]
        ok = [w for w in want if isinstance(w, PromptRow)]
        assert got.row_ids.tolist() == [w.row_id for w in ok]
        assert got.lengths.tolist() == [len(w.token_ids) for w in ok]
        assert got.tokens.tolist() == [t for w in ok for t in w.token_ids]
        assert [(f.row_id, f.error) for f in got.failed] == [(w.row_id, w.error) for w in want if isinstance(w, FailedRow)]
        assert cut == sum(1 for w in ok if w.truncated)


def test_sigterm_removes_the_token_spool(tmp_path: Path, template: Path, tok_dir: Path) -> None:
    """A terminated analyze exits 143 with one line and leaves no temporary files behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = make_rows(40)
    table = write_parquet(tmp_path / "big.parquet", [dict(rows[i % 40], question=f"{rows[i % 40]['question']} {i} " * 8)
                                                     for i in range(60_000)])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), NO_COLOR="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchllm_cli", "analyze", str(table), "-t", str(template), "--tokenizer", str(tok_dir),
         "--no-chat"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp.glob("batchllm-*/tokens.i32")):  # the spool exists: rows are being tokenized
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("error: Interrupted by SIGTERM"), err
    assert "Traceback" not in err
    assert list(tmp.iterdir()) == []
