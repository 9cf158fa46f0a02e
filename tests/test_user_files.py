"""batchllm never loses or corrupts the user's files (issue 10, items 1, 2, 3, 8, 12): the run directory
is its own, no written path may be a read one, the input is a snapshot, finished jobs can be re-run, and
`status` tells the truth. On the demo model with a few rows; every refusal is checked for its exit code,
its one line, and the user's files byte for byte."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import cli_process
from reliability_utils import (
    assert_finished_cleanly,
    flat,
    invoke,
    job_args,
    one_error_line,
    read_rows,
    sha256,
    snapshot,
    write_rows_csv,
    write_template,
)

ROWS = 12


class Files:
    """A job's input, template and output in a fresh folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inp = write_rows_csv(root / "in.csv", ROWS)
        self.tpl = write_template(root / "t.j2")
        self.out = root / "o.parquet"
        self.marker = root / "o.parquet.success.json"
        self.run_dir = root / "o.parquet.batchllm"

    def args(self, *extra: str) -> list[str]:
        return job_args(self.inp, self.tpl, self.out, "--checkpoint-rows", "4", *extra)


@pytest.fixture
def files(tmp_path: Path, env: dict[str, str]) -> Files:
    return Files(tmp_path)


def refused(args: list[str], root: Path, *expect: str, code: int = 2) -> str:
    """Run `args`; assert it is refused with `code` and one line holding `expect`, and changed nothing."""
    before = snapshot(root)
    result = invoke(args)
    assert result.exit_code == code, result.output
    line = one_error_line(result.stderr)
    for text in expect:
        assert text in line, line
    assert snapshot(root) == before  # byte for byte, and nothing created
    return line


# ---- 1. the run directory is batchllm's alone ---------------------------------------------------------
def test_checkpoint_dir_holding_user_files_is_refused_and_kept(files: Files, no_model: None) -> None:
    folder = files.root / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.txt").write_text("also precious")
    refused(files.args("--checkpoint-dir", str(folder)), files.root,
            f"Checkpoint directory {folder}", "notes.txt", "not batchllm's")
    # A file named like batchllm's but in the wrong place or of the wrong kind is still not batchllm's.
    (folder / "notes.txt").unlink()
    shutil.rmtree(folder / "sub")
    (folder / "quarantine").mkdir()
    (folder / "quarantine" / "family.jpg").write_bytes(b"\xff\xd8")
    refused(files.args("--checkpoint-dir", str(folder)), files.root, "quarantine/family.jpg")


def test_checkpoint_dir_dot_is_refused(files: Files, no_model: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(files.root)
    args = job_args(Path("in.csv"), Path("t.j2"), Path("o.parquet"), "--checkpoint-dir", ".")
    refused(args, files.root, "in.csv")  # its input lives there: named as inside, or as a foreign file


def test_existing_empty_checkpoint_dir_is_used_and_kept_a_new_one_is_removed(files: Files) -> None:
    given = files.root / "ckpt"
    given.mkdir()
    result = invoke(files.args("--checkpoint-dir", str(given)))
    assert result.exit_code == 0, result.output
    assert given.is_dir() and list(given.iterdir()) == []  # the user's (empty) folder stays
    new = files.root / "new" / "ckpt"
    files.out.unlink()
    result = invoke(files.args("--checkpoint-dir", str(new)))
    assert result.exit_code == 0, result.output
    assert not new.exists() and not new.parent.exists()  # batchllm made both, and removed them once empty
    kept = files.root / "mine" / "deeper" / "ckpt"
    (files.root / "mine").mkdir()
    (files.root / "mine" / "notes.txt").write_text("the user's")
    files.out.unlink()
    assert invoke(files.args("--checkpoint-dir", str(kept))).exit_code == 0
    assert not kept.parent.exists() and (files.root / "mine" / "notes.txt").exists()  # made: gone; the user's: kept


def _run_dir_with_files(path: Path):  # noqa: ANN202 - RunDir
    from batchllm_cli.checkpoint import RunDir
    from batchllm_cli.collector import ResultCollector

    rd = RunDir(path)
    assert rd.ensure()
    rd.create({}, {}, dir_created=True)
    c = ResultCollector()
    c.add_failure(0, "bad", "template_error")
    rd.commit_shard(c.drain(), 1)
    (rd.path / "quarantine").mkdir()
    (rd.path / "quarantine" / "shard-000007.json.20260101T000000.abcdef").write_text("{}")
    return rd


def test_cleanup_removes_only_batchllm_files_by_name(tmp_path: Path) -> None:
    rd = _run_dir_with_files(tmp_path / "alone")
    rd.remove()
    assert not rd.path.exists()  # it made the directory and nothing else is in it
    # Something of the user's lands in the directory while the run works: it survives, and so do the
    # directories that hold it.
    rd = _run_dir_with_files(tmp_path / "shared")
    (rd.path / "later.txt").write_text("mine")
    (rd.path / "quarantine" / "mine.txt").write_text("mine too")
    rd.remove()
    assert sorted(str(p.relative_to(rd.path)) for p in rd.path.rglob("*")) == [
        "later.txt", "quarantine", "quarantine/mine.txt"]
    assert (rd.path / "later.txt").read_text() == "mine"


# ---- 2. no written path is a read path or another written path ---------------------------------------
def _link(kind: str, target: Path, link: Path) -> Path:
    (os.link if kind == "hardlink" else os.symlink)(target, link)
    return link


@pytest.mark.parametrize("case", [
    "summary_is_input", "summary_is_template", "summary_is_output", "summary_is_errors_file",
    "summary_symlink_to_input", "summary_hardlink_of_template", "input_is_errors_file",
    "input_is_marker", "input_is_rejects_file", "output_lock_hardlink_of_input", "summary_is_model_file",
    "checkpoint_dir_holds_output", "output_is_template",
])
def test_written_path_that_is_a_read_or_written_path_is_refused(
    files: Files, case: str, demo_model_dir: Path, no_model: None
) -> None:
    f = files
    args = f.args()
    expect: tuple[str, ...]
    if case == "summary_is_input":
        args += ["--summary", str(f.inp)]
        expect = ("--summary", "the input file", str(f.inp))
    elif case == "summary_is_template":
        args += ["--summary", str(f.tpl)]
        expect = ("--summary", "the template", str(f.tpl))
    elif case == "summary_is_output":
        args += ["--summary", str(f.out)]
        expect = ("--output", "--summary", str(f.out))
    elif case == "summary_is_errors_file":
        args += ["--summary", str(f.root / "o.parquet.errors.jsonl")]
        expect = ("the errors file", "--summary")
    elif case == "summary_symlink_to_input":
        args += ["--summary", str(_link("symlink", f.inp, f.root / "s.json"))]
        expect = ("--summary", "the input file")
    elif case == "summary_hardlink_of_template":
        args += ["--summary", str(_link("hardlink", f.tpl, f.root / "s.json"))]
        expect = ("--summary", "the template")
    elif case in ("input_is_errors_file", "input_is_marker", "input_is_rejects_file"):
        side = {"input_is_errors_file": "errors.jsonl", "input_is_marker": "success.json",
                "input_is_rejects_file": "rejects.jsonl"}[case]
        inp = f.root / f"o.parquet.{side}"
        inp.write_text('{"id": 1, "text": "a"}\n' if side.endswith("jsonl") else '[{"id": 1, "text": "a"}]')
        args = job_args(inp, f.tpl, f.out)
        expect = ("the input file", str(inp))
    elif case == "output_lock_hardlink_of_input":
        _link("hardlink", f.inp, f.root / "o.parquet.lock")
        expect = ("the output lock", "the input file")
    elif case == "summary_is_model_file":
        model = f.root / "model"
        shutil.copytree(demo_model_dir, model)
        args += ["--model", str(model), "--summary", str(model / "config.json")]
        expect = ("--summary", "the model file", "config.json")
    elif case == "output_is_template":
        tpl = write_template(f.root / "prompt.csv")  # any name will do for a template
        args = job_args(f.inp, tpl, tpl)
        expect = ("--output", "the template", str(tpl))
    else:  # the output inside the checkpoint directory: the directory would not be batchllm's alone
        args = job_args(f.inp, f.tpl, f.root / "ck" / "o.parquet", "--checkpoint-dir", str(f.root / "ck"))
        (f.root / "ck").mkdir()
        expect = ("--checkpoint-dir", "--output")
    line = refused(args, f.root, *expect)
    assert "would overwrite" in line


def test_side_paths_that_are_links_or_directories_are_refused(files: Files, no_model: None) -> None:
    precious = files.root / "precious.txt"
    precious.write_text("mine")
    lock = _link("symlink", precious, files.root / "o.parquet.lock")  # would be truncated and removed
    refused(files.args(), files.root, "lock file", str(lock))
    lock.unlink()
    (files.root / "o.parquet.success.json").mkdir()
    refused(files.args(), files.root, "the completion marker", "is a directory")
    (files.root / "o.parquet.success.json").rmdir()
    ckpt = files.root / "ck"
    ckpt.mkdir()
    _link("symlink", precious, ckpt / "manifest.json")  # named like batchllm's, but not a file it made
    refused(files.args("--checkpoint-dir", str(ckpt)), files.root, "manifest.json", "not batchllm's")
    assert precious.read_text() == "mine"


def test_a_refused_run_creates_no_directories(files: Files, no_model: None) -> None:
    """Output and checkpoint directories that do not exist yet are made only once every check has
    passed, and removed again when a later check (the strict read of the file) refuses the run."""
    new_out = files.root / "new" / "deeper" / "o.parquet"
    bad_tpl = write_template(files.root / "bad.j2", "{{ no_such_column }}")
    refused(job_args(files.inp, bad_tpl, new_out), files.root, "no_such_column")
    refused(job_args(files.inp, files.tpl, new_out, "--checkpoint-dir", str(files.root / "ck" / "a"),
                     "--max-tokens", "100000"), files.root, "--max-tokens")
    broken = files.root / "broken.csv"
    broken.write_text("text\nok\n\"never closed\n", encoding="utf-8")
    refused(job_args(broken, files.tpl, new_out), files.root, "broken.csv")
    assert not (files.root / "new").exists()


def test_analyze_report_path_that_is_the_input_is_refused(files: Files, no_model: None) -> None:
    refused(["analyze", str(files.inp), "-t", str(files.tpl), "--json", str(files.inp)], files.root,
            "--json", "the input file")
    refused(["analyze", str(files.inp), "-t", str(files.tpl), "--json", str(files.root / "r.html"),
             "--html", str(files.root / "r.html")], files.root, "--json", "--html")
    # both on stdout: the two reports came out mixed, as invalid JSON, with exit 0
    refused(["analyze", str(files.inp), "-t", str(files.tpl), "--json", "-", "--html", "-"], files.root,
            "--json -", "--html -", "stdout")


def test_a_report_or_summary_onto_a_file_a_flag_reads_is_refused(files: Files, no_model: None) -> None:
    """--json-schema, --choices @FILE and --system @FILE are files the command reads, as the template is:
    neither analyze's reports nor run's --summary may overwrite them."""
    schema = files.root / "schema.json"
    schema.write_text('{"type": "string"}', encoding="utf-8")
    labels = files.root / "labels.txt"
    labels.write_text("yes\nno\n", encoding="utf-8")
    system = files.root / "system.txt"
    system.write_text("Be brief.\n", encoding="utf-8")
    analyze = ["analyze", str(files.inp), "-t", str(files.tpl)]
    line = refused([*analyze, "--json-schema", str(schema), "--json", str(schema)], files.root,
                   "--json", "--json-schema", str(schema))
    assert "would overwrite" in line
    refused([*analyze, "--choices", f"@{labels}", "--html", str(labels)], files.root, "--html", "--choices")
    refused([*analyze, "--system", f"@{system}", "--json", str(system)], files.root, "--json", "--system")
    refused(files.args("--system", f"@{system}", "--summary", str(system)), files.root, "--summary", "--system")


# ---- 3. the input is a snapshot --------------------------------------------------------------------
class _ChangeInput:
    """A RunObserver that changes the input file when the first row finishes (as another program
    writing to it during the run would)."""

    def __init__(self, path: Path, how: str) -> None:
        self.path, self.how, self.done = path, how, False

    def notice(self, message: str) -> None:
        pass

    def start(self, total_rows: int, resumed_rows: int, work: object) -> None:
        pass

    def advance(self, rows: int, completion_tokens: int) -> None:
        if self.done:
            return
        self.done = True
        st = self.path.stat()
        data = self.path.read_bytes()
        if self.how == "append":
            self.path.write_bytes(data + "".join(f"{i},appended {i}\r\n" for i in range(100, 600)).encode())
        else:  # the same size and, put back, the same mtime: only the content hash can tell
            self.path.write_bytes(data.replace(b"r3 d", b"r3 D", 1))
            os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("how", ["append", "rewrite_same_size"])
def test_input_changed_during_the_run_stops_with_exit_4_and_keeps_the_checkpoint(files: Files, how: str) -> None:
    from batchllm_cli.errors import InputChanged
    from batchllm_cli.job import run_job
    from batchllm_cli.job_types import RunSettings

    original = files.inp.read_bytes()
    settings = RunSettings(input=files.inp, template=str(files.tpl), output=files.out, max_tokens=3,
                           kv_cache_memory=16 << 20, chat=False, max_batch_tokens=2048, checkpoint_rows=4)
    with pytest.raises(InputChanged) as info:
        run_job(settings, _ChangeInput(files.inp, how))
    message = str(info.value)
    assert info.value.exit_code == 4 and "\n" not in message
    assert f"The input {files.inp} changed while the job ran" in message and "--restart" in message
    assert ("size went from" in message) == (how == "append")
    assert not files.out.exists() and not files.marker.exists()
    assert not [p for p in files.root.iterdir() if p.name.endswith((".tmp", ".lock"))]
    assert len(list(files.run_dir.glob("shard-*.json"))) == ROWS // 4  # every answer is kept
    # The same command on the changed input is refused (another job); with the original back it
    # writes the output from the checkpoint alone.
    result = invoke(files.args())
    assert result.exit_code == 4 and "input" in one_error_line(result.stderr)
    files.inp.write_bytes(original)
    result = invoke(files.args())
    assert result.exit_code == 0, result.output
    assert f"{ROWS} of {ROWS} rows already done" in flat(result.stderr)
    assert [r["id"] for r in read_rows(files.out)] == [str(i) for i in range(ROWS)]  # CSV values are text
    assert_finished_cleanly(files.out, ROWS)


def test_input_check_reads_the_input_only_when_its_identity_changed(tmp_path: Path) -> None:
    from batchllm_cli.fingerprint import file_digest, file_identity, input_change

    inp = write_rows_csv(tmp_path / "in.csv", 3)
    fp = {"input.size": inp.stat().st_size, "input.content": file_digest(inp),
          "input.identity": list(file_identity(inp))}
    assert input_change(inp, fp) is None
    # An unchanged identity stands for the content (the recorded hash is not even compared) ...
    assert input_change(inp, fp | {"input.content": "0" * 64}) is None
    # ... and any write changes the identity (ctime), even with the size and mtime put back.
    st = inp.stat()
    inp.write_bytes(inp.read_bytes().replace(b"r1 b", b"r1 B"))
    os.utime(inp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert input_change(inp, fp) == "its content was rewritten (same size)"
    inp.unlink()
    assert input_change(inp, fp) == "it was removed or cannot be read"


def test_a_checkpoint_without_finished_rows_does_not_block_a_corrected_command(
    files: Files, env: dict[str, str]
) -> None:
    # The first try dies before its first commit (as when the model fails to load after the manifest).
    code, log = cli_process.run(files.args(), {**env, "BATCHLLM_CRASH_AT": "shard_write"})
    assert code == 137, log
    assert (files.run_dir / "manifest.json").is_file() and not list(files.run_dir.glob("shard-*"))
    result = invoke(files.args("--seed", "5"))  # a changed job: nothing committed, so nothing to refuse
    assert result.exit_code == 0, result.output
    assert "holds no finished rows" in flat(result.stderr)
    assert assert_finished_cleanly(files.out, ROWS)["fingerprint"]["seed"] == 5


# ---- 8. re-running finished jobs -------------------------------------------------------------------
# Long rows need more KV cache than 32 tokens: they fail as engine errors, the short ones succeed.
SMALL_CACHE = ["--kv-cache-tokens", "32", "--block-size", "16"]
BIG_CACHE = ["--kv-cache-tokens", "1024", "--block-size", "16"]


def _mixed_input(path: Path) -> Path:
    lines = ["id,text"] + [f"{i},{'word ' * (40 if i % 3 == 0 else 2)}{i}" for i in range(9)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("keep", [False, True])
def test_retry_errors_reruns_only_the_failed_rows_of_a_finished_job(files: Files, keep: bool) -> None:
    _mixed_input(files.inp)
    extra = ["--keep-checkpoints"] if keep else []
    result = invoke(files.args(*SMALL_CACHE, *extra))
    assert result.exit_code == 3, result.output
    first = read_rows(files.out)
    failed = [r["id"] for r in first if r["response_error"] is not None]
    assert failed == ["0", "3", "6"] and "raise --kv-cache-memory" in first[0]["response_error"]
    input_hash = sha256(files.inp)

    # Following the advice without --retry-errors changes nothing: the job is finished.
    result = invoke(files.args(*BIG_CACHE, *extra))
    assert result.exit_code == 0 and "already finished" in flat(result.stderr)
    result = invoke(files.args(*BIG_CACHE, *extra, "--retry-errors"))
    assert result.exit_code == 0, result.output
    assert "--retry-errors: 3 row(s) in error will run again" in flat(result.stderr)
    assert "6 of 9 rows already done" in flat(result.stderr)
    rows = read_rows(files.out)
    assert all(r["response_error"] is None for r in rows)
    kept = [(r["id"], r["response"]) for r in first if r["id"] not in failed]
    assert [(r["id"], r["response"]) for r in rows if r["id"] not in failed] == kept
    reference = files.root / "ref.parquet"
    result = invoke(job_args(files.inp, files.tpl, reference, *BIG_CACHE))
    assert result.exit_code == 0, result.output
    assert rows == read_rows(reference)  # as if the whole job had run with the big cache
    assert sha256(files.inp) == input_hash
    assert not files.out.with_name("o.parquet.errors.jsonl").exists()
    assert_finished_cleanly(files.out, 9, keep_checkpoints=keep)
    # Nothing left in error: --retry-errors has nothing to do.
    result = invoke(files.args(*BIG_CACHE, *extra, "--retry-errors"))
    assert result.exit_code == 0 and "already finished" in flat(result.stderr)


def test_retry_errors_with_another_column_name_retries_under_it(files: Files) -> None:
    _mixed_input(files.inp)
    assert invoke(files.args(*SMALL_CACHE)).exit_code == 3
    first = read_rows(files.out)
    result = invoke(files.args(*BIG_CACHE, "--retry-errors", "--column", "answer"))
    assert result.exit_code == 0, result.output
    assert "--retry-errors: 3 row(s) in error will run again" in flat(result.stderr)
    rows = read_rows(files.out)
    assert all(r["answer_error"] is None and "response" not in r for r in rows)
    assert [r["answer"] for r in rows if r["id"] not in ("0", "3", "6")] == [
        r["response"] for r in first if r["response_error"] is None]
    assert assert_finished_cleanly(files.out, 9)["column"] == "answer"


def _forbid_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if anything loads model weights from now on (as the no_model fixture, after a first run)."""
    import engine.llm_engine

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("no row should run")

    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", forbidden)


def _renamed(row: dict, old: str, new: str) -> dict:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in row.items()}


@pytest.mark.parametrize("keep", [False, True])
def test_finished_job_run_with_another_column_is_written_again_under_it(
    files: Files, keep: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --column is no part of the job (a resume may change it), so a finished job re-run with another
    # one must not say "nothing to do" and leave the old names: its answers are written again under the
    # new ones, from the finished output (or the kept checkpoint), without running any row.
    _mixed_input(files.inp)
    extra = ["--keep-checkpoints"] if keep else []
    assert invoke(files.args(*SMALL_CACHE, *extra)).exit_code == 3
    first, first_marker = read_rows(files.out), json.loads(files.marker.read_text())
    errors_file = files.root / "o.parquet.errors.jsonl"
    errors = errors_file.read_bytes()
    _forbid_model(monkeypatch)
    summary = files.root / "s.json"
    result = invoke(files.args(*SMALL_CACHE, *extra, "--column", "ans", "--summary", str(summary)))
    assert result.exit_code == 3, result.output  # written now, with the job's rows in error
    assert "as --column response; it is written again as --column ans without running any row" in flat(result.stderr)
    assert read_rows(files.out) == [_renamed(r, "response", "ans") for r in first]
    assert errors_file.read_bytes() == errors  # error types and all
    marker = assert_finished_cleanly(files.out, 9, keep_checkpoints=keep)
    assert (marker["column"], marker["model"], marker["rows_failed"]) == ("ans", first_marker["model"], 3)
    report = json.loads(summary.read_text())
    assert (report["state"], report["exit_code"], report["already_done"]) == ("finished_with_errors", 3, False)
    assert (report["attempt"]["rows"], report["job"]["rows"], report["model"]) == (0, 9, first_marker["model"])
    result = invoke(files.args(*SMALL_CACHE, *extra, "--column", "ans"))
    assert result.exit_code == 0 and "already finished" in flat(result.stderr)


def test_finished_csv_output_with_typed_columns_is_written_again_under_another_column(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = files.root / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
    out = files.root / "o.csv"
    args = job_args(files.inp, files.tpl, out, "--json-schema", str(schema), "--max-tokens", "12")
    assert invoke(args).exit_code in (0, 3)
    first = read_rows(out)
    assert "response_n" in first[0]
    _forbid_model(monkeypatch)
    assert invoke([*args, "--column", "ans"]).exit_code in (0, 3)
    assert read_rows(out) == [_renamed(r, "response", "ans") for r in first]
    assert_finished_cleanly(out, ROWS)


def test_finished_job_whose_marker_does_not_name_its_column(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    # A marker written before it recorded --column: the same column is finished; another is refused
    # (its answers cannot be found) before anything changes, also with --retry-errors.
    _mixed_input(files.inp)
    assert invoke(files.args(*SMALL_CACHE)).exit_code == 3
    marker = json.loads(files.marker.read_text())
    del marker["column"]
    files.marker.write_text(json.dumps(marker))
    _forbid_model(monkeypatch)
    result = invoke(files.args(*SMALL_CACHE))
    assert result.exit_code == 0 and "already finished" in flat(result.stderr)
    for retry in ([], ["--retry-errors"]):
        refused(files.args(*SMALL_CACHE, *retry, "--column", "ans"), files.root,
                "under another --column", "does not record", "--restart")


def test_finished_job_without_its_errors_file_is_not_rewritten_under_another_column(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The output has no error type column: the errors file keeps them, and a rewrite must not lose them.
    _mixed_input(files.inp)
    assert invoke(files.args(*SMALL_CACHE)).exit_code == 3
    (files.root / "o.parquet.errors.jsonl").unlink()
    _forbid_model(monkeypatch)
    refused(files.args(*SMALL_CACHE, "--column", "ans"), files.root,
            "--column ans", "o.parquet.errors.jsonl", "does not list the 3 rows in error", "--restart")


def test_retry_errors_of_a_changed_job_says_every_row_runs(files: Files) -> None:
    _mixed_input(files.inp)
    assert invoke(files.args(*SMALL_CACHE)).exit_code == 3
    result = invoke(files.args(*BIG_CACHE, "--retry-errors", "--max-tokens", "5"))  # another job now
    assert result.exit_code == 0, result.output
    message = flat(result.stderr)
    assert "no finished or checkpointed run of this job to retry, so every row runs" in message
    assert "row(s) in error will run again" not in message
    assert_finished_cleanly(files.out, 9)


def test_retry_errors_on_an_interrupted_job(files: Files, env: dict[str, str]) -> None:
    _mixed_input(files.inp)
    code, log = cli_process.run(files.args(*SMALL_CACHE, "--checkpoint-rows", "3"),
                                {**env, "BATCHLLM_CRASH_AT": "manifest_update:2"})
    assert code == 137, log
    st = json.loads(invoke(["status", str(files.out), "--json"]).stdout)
    assert st["rows_done"] == 6 and st["rows_failed"] >= 1
    result = invoke(files.args(*BIG_CACHE, "--retry-errors"))
    assert result.exit_code == 0, result.output
    message = flat(result.stderr)
    assert f"--retry-errors: {st['rows_failed']} row(s) in error will run again" in message
    assert f"{6 - st['rows_failed']} of 9 rows already done" in message
    assert all(r["response_error"] is None for r in read_rows(files.out))
    assert_finished_cleanly(files.out, 9)


def test_restart_reruns_a_finished_job_and_replaces_the_output_only_when_complete(
    files: Files, env: dict[str, str]
) -> None:
    result = invoke(files.args())
    assert result.exit_code == 0, result.output
    old_hash, old_inode = sha256(files.out), files.out.stat().st_ino
    # A restart killed after the new output is complete but before it is renamed into place: the old
    # output is untouched, and the old marker no longer claims anything.
    code, log = cli_process.run(files.args("--restart"), {**env, "BATCHLLM_CRASH_AT": "final_write"})
    assert code == 137, log
    assert "running every row of the finished job again" in log
    assert (sha256(files.out), files.out.stat().st_ino) == (old_hash, old_inode)
    assert not files.marker.exists()
    result = invoke(files.args("--restart"))
    assert result.exit_code == 0, result.output
    assert "already finished" not in result.stderr and "discarding the checkpoint" in flat(result.stderr)
    assert files.out.stat().st_ino != old_inode  # a new file, renamed over the old one
    assert sha256(files.out) == old_hash  # the same job gives the same answers
    assert_finished_cleanly(files.out, ROWS)
    # And from a finished state with no checkpoint left at all.
    result = invoke(files.args("--restart"))
    assert result.exit_code == 0, result.output
    assert "running every row of the finished job again" in flat(result.stderr)
    assert f"done: {ROWS} rows" in flat(result.stderr)
    assert_finished_cleanly(files.out, ROWS)


def test_restart_and_retry_errors_together_are_refused(files: Files, no_model: None) -> None:
    refused(files.args("--restart", "--retry-errors"), files.root, "--restart", "--retry-errors")


# ---- 12. status and the marker ---------------------------------------------------------------------
def test_status_liveness_comes_from_the_lock_not_the_pid(files: Files) -> None:
    from batchllm_cli.file_lock import FileLock

    assert invoke(files.args("--keep-checkpoints")).exit_code == 0
    lock_path = files.root / "o.parquet.lock"
    lock_path.write_text(json.dumps({"pid": 1, "host": os.uname().nodename}))  # pid 1 is always alive
    st = json.loads(invoke(["status", str(files.out), "--json"]).stdout)
    assert st["state"] == "finished" and st["pid"] is None
    lock = FileLock(lock_path)
    lock.acquire("o.parquet")
    try:
        st = json.loads(invoke(["status", str(files.out), "--json"]).stdout)
    finally:
        lock.release()
    assert st["state"] == "running"


def test_status_and_rerun_check_the_outputs_hash(files: Files) -> None:
    assert invoke(files.args()).exit_code == 0
    data = bytearray(files.out.read_bytes())
    st = files.out.stat()
    # The same size and mtime, one byte changed: a size check would call it finished.
    data[len(data) // 2] ^= 0xFF
    files.out.write_bytes(bytes(data))
    os.utime(files.out, ns=(st.st_atime_ns, st.st_mtime_ns))
    status = json.loads(invoke(["status", str(files.out), "--json"]).stdout)
    assert status["state"] != "finished" and "no longer matches its completion marker" in status["problems"][0]
    result = invoke(files.args())
    assert result.exit_code == 0, result.output
    assert "no longer matches its completion marker" in flat(result.stderr)
    assert "already finished" not in result.stderr
    assert_finished_cleanly(files.out, ROWS)
    # Deleted output: not finished either.
    files.out.unlink()
    status = json.loads(invoke(["status", str(files.out), "--json"]).stdout)
    assert status["state"] == "not started" and status["problems"]


def test_an_output_file_no_batchllm_job_wrote_is_refused_unless_overwrite(files: Files, no_model: None) -> None:
    files.out.write_bytes(b"the user's own table")
    for side in (files.root / "o.parquet.errors.jsonl", files.root / "o.parquet.lock"):
        side.write_text("the user's notes\n")
    line = refused(files.args(), files.root, str(files.out), "no batchllm job wrote it", "--overwrite")
    assert "Traceback" not in line
    # status agrees: not a job that has yet to start (exit 12, which a sensor reads as "start it")
    status = invoke(["status", str(files.out)])
    assert status.exit_code == 2 and "no batchllm job wrote it" in flat(status.stderr), status.output
    as_json = invoke(["status", str(files.out), "--json"])  # a sensor parsing stdout still gets JSON
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["exit_code"] == 2


def test_overwrite_replaces_a_foreign_output_once_the_new_one_is_complete(files: Files) -> None:
    files.out.write_bytes(b"the user's own table")
    result = invoke(files.args("--overwrite"))
    assert result.exit_code == 0, result.output
    assert_finished_cleanly(files.out, ROWS)


def test_an_output_whose_marker_was_lost_with_its_checkpoint_kept_resumes(files: Files) -> None:
    """A run killed between renaming its output into place and writing the marker left the output
    without a marker but with its checkpoint: that output is batchllm's, and the run finishes it."""
    assert invoke(files.args("--keep-checkpoints")).exit_code == 0
    files.marker.unlink()
    result = invoke(files.args())
    assert result.exit_code == 0, result.output
    assert_finished_cleanly(files.out, ROWS)


MALFORMED_MARKERS = {
    "garbage": b"\x00\xffnot json",
    "list": b"[1, 2]",
    "string_rows": None,  # filled in from a real marker
    "null_sha": None,
}


@pytest.mark.parametrize("kind", list(MALFORMED_MARKERS))
def test_malformed_marker_is_one_line_in_status_and_run(files: Files, kind: str) -> None:
    assert invoke(files.args()).exit_code == 0
    real = json.loads(files.marker.read_text())
    if kind == "string_rows":
        files.marker.write_text(json.dumps(real | {"rows": "12", "rows_failed": [0]}))
    elif kind == "null_sha":
        files.marker.write_text(json.dumps(real | {"output_sha256": None}))
    else:
        files.marker.write_bytes(MALFORMED_MARKERS[kind])
    status = invoke(["status", str(files.out)])
    assert status.exit_code == 12, status.output  # not started: the marker does not count
    problems = [line for line in status.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "not a valid batchllm marker" in problems[0]
    assert "state: finished" not in status.stdout
    result = invoke(files.args())  # the job runs again and writes a valid marker
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "not a valid batchllm marker" in flat(result.stderr)
    assert_finished_cleanly(files.out, ROWS)


def test_malformed_commit_records_are_reported_and_their_rows_rerun(files: Files, env: dict[str, str]) -> None:
    code, log = cli_process.run(files.args(), {**env, "BATCHLLM_CRASH_AT": "manifest_update:2"})
    assert code == 137, log
    record = files.run_dir / "shard-000002.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"rows": "4", "committed_at": "soon"}))
    status = invoke(["status", str(files.out)])
    assert status.exit_code == 11, status.output  # interrupted
    assert "problem: 1 commit record(s)" in status.stdout and "rows: 4/12 done" in status.stdout
    result = invoke(files.args())
    assert result.exit_code == 0, result.output
    assert "4 of 12 rows already done" in flat(result.stderr)
    assert_finished_cleanly(files.out, ROWS)
