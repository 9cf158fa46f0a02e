"""Helpers shared by the CLI tests: in-process invocation, tables, job arguments, output checks."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

# The demo model, a few tokens per row, a small KV cache: each row costs milliseconds on a CPU.
FAST = ["--max-tokens", "3", "--kv-cache-memory", "16MiB", "--no-chat", "--max-batch-tokens", "2048"]
SEEDED = ["--temperature", "0.8", "--seed", "7"]
# a wide, colourless terminal: help and error text come out unwrapped and plain
CLI_ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}
_runner = CliRunner()


def invoke(args: list[str]):  # noqa: ANN201 - click's Result
    """`batchllm ARGS` in this process."""
    from batchllm_cli.app import app

    return _runner.invoke(app, args, env=CLI_ENV)


def flat(text: str) -> str:
    return " ".join(text.split())


def one_error_line(stderr: str) -> str:
    """The one `error: ...` line a refused command prints (notes aside)."""
    lines = [line for line in stderr.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def write_rows_csv(path: Path, n: int, start: int = 0) -> Path:
    """`id,text` rows with short, distinct texts (short prompts keep the engine fast)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i in range(start, start + n):
            w.writerow([i, f"r{i} {'abcdefgh'[i % 8]}"])
    return path


def write_template(path: Path, text: str = "Say: {{ text }}") -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def job_args(inp: Path, tpl: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(inp), "-t", str(tpl), "-o", str(out), *FAST, *extra]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    from batchllm_cli.table_io import read_table

    return read_table(path).to_pylist()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_finished_cleanly(out: Path, rows: int, keep_checkpoints: bool = False) -> dict[str, Any]:
    """The marker is present and matches the output; nothing temporary or locked is left behind."""
    marker_file = out.with_name(out.name + ".success.json")
    assert marker_file.is_file(), f"no completion marker beside {out}"
    marker = json.loads(marker_file.read_text())
    assert marker["status"] == "finished"
    assert marker["rows"] == rows
    assert marker["output_bytes"] == out.stat().st_size
    assert marker["output_sha256"] == sha256(out)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.endswith((".tmp", ".lock", ".pending"))]
    assert not leftovers, leftovers
    run_dir = out.with_name(out.name + ".batchllm")
    assert run_dir.exists() == keep_checkpoints
    return marker


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file under `directory` with its bytes, and every directory (None), to prove a refused run
    changed nothing and created nothing."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
        if p.is_file() or p.is_dir()
    }


def committed_row_ids(run_dir: Path) -> list[int]:
    """Row ids of every committed shard (commit record present and matching), in shard order."""
    ids: list[int] = []
    for record in sorted(run_dir.glob("shard-*.json")):
        meta = json.loads(record.read_text())
        shard = run_dir / meta["shard"]
        data = shard.read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
        ids += pq.read_table(pa.BufferReader(data)).column("__batchllm_row_id").to_pylist()
    return ids
