"""What INPUT may be and how it is read, through the CLI with real files: several files, a directory
(hive partitions too), --input-glob against literal names, stdin, .csv.gz, .tsv, URLs, --where,
--columns, --encoding, and the resume fingerprint of each."""
from __future__ import annotations

import csv
import functools
import gzip
import http.server
import json
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchllm_cli.table_io import read_table
from reliability_utils import one_error_line

FAST = ["--max-tokens", "2", "--kv-cache-memory", "16MiB"]
runner = CliRunner()


@pytest.fixture(autouse=True)
def demo_cache(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(demo_model_dir.parent))


def invoke(args: list[str], stdin: bytes | None = None):  # noqa: ANN201 - click's Result
    from batchllm_cli.app import app

    return runner.invoke(app, [str(a) for a in args], input=stdin)


def run(inputs: list[Path | str], out: Path, tpl: Path, *extra: str, stdin: bytes | None = None):  # noqa: ANN201
    return invoke(["run", *inputs, "-t", tpl, "-o", out, *FAST, *extra], stdin)


def write_csv(path: Path, rows: list[dict], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": str(i), "text": f"row {i}"} for i in range(start, start + n)]


@pytest.fixture
def tpl(tmp_path: Path) -> Path:
    path = tmp_path / "t.j2"
    path.write_text("Say: {{ text }}", encoding="utf-8")
    return path


def input_columns(out: Path, *names: str) -> list[dict]:
    return read_table(out).select(list(names)).to_pylist()


def ok(result) -> None:  # noqa: ANN001
    assert result.exit_code == 0, result.output


# ---- several files, directories, patterns ----------------------------------------------------------
def test_several_files_are_one_table_in_the_order_given(tmp_path: Path, tpl: Path) -> None:
    b = write_csv(tmp_path / "b.csv", rows(2, 10))
    a = write_csv(tmp_path / "a.csv", rows(3))
    out = tmp_path / "out.parquet"
    ok(run([b, a], out, tpl))
    assert [r["id"] for r in input_columns(out, "id")] == ["10", "11", "0", "1", "2"]
    # Files with other columns are refused, naming both, before anything is written.
    write_csv(tmp_path / "c.csv", [{"id": "1", "body": "x"}])
    result = run([a, tmp_path / "c.csv"], tmp_path / "o2.parquet", tpl)
    assert result.exit_code == 2
    assert "different columns" in one_error_line(result.stderr) and "c.csv has (id, body)" in result.stderr
    assert not (tmp_path / "o2.parquet").exists()


def test_directory_with_hive_partitions_and_outputs_kept_out_of_it(tmp_path: Path, tpl: Path) -> None:
    data = tmp_path / "data"
    for lang, ids in (("fr", [5, 6]), ("en", [1, 2, 3])):
        part = data / f"lang={lang}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"id": ids, "text": [f"t{i}" for i in ids]}), part / "part-0.parquet")
    (data / "_SUCCESS").write_text("")  # Spark's marker files are not data
    out = tmp_path / "out.parquet"
    ok(run([data], out, tpl))
    # Sorted paths (lang=en before lang=fr), then file order; the partition is a text column.
    assert input_columns(out, "id", "lang") == [
        {"id": 1, "lang": "en"}, {"id": 2, "lang": "en"}, {"id": 3, "lang": "en"},
        {"id": 5, "lang": "fr"}, {"id": 6, "lang": "fr"},
    ]
    assert read_table(out).schema.field("id").type == pa.int64()  # the files' own types pass through
    # An output (or anything the run writes) inside the input directory would be read by the next run.
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run([data], data / "lang=en" / "out.parquet", tpl)
    assert result.exit_code == 2
    assert "inside the input directory" in one_error_line(result.stderr)
    result = run([data], tmp_path / "o.parquet", tpl, "--checkpoint-dir", str(data / "ck"))
    assert result.exit_code == 2 and "inside the input directory" in one_error_line(result.stderr)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_pattern_needs_input_glob_and_a_literal_name_stays_literal(tmp_path: Path, tpl: Path) -> None:
    write_csv(tmp_path / "a*.csv", rows(1, 100))  # a file really named a*.csv
    write_csv(tmp_path / "a2.csv", rows(2, 20))
    write_csv(tmp_path / "a1.csv", rows(2, 10))
    out = tmp_path / "out" / "lit.parquet"
    ok(run([tmp_path / "a*.csv"], out, tpl))
    assert [r["id"] for r in input_columns(out, "id")] == ["100"]
    out = tmp_path / "out" / "glob.parquet"
    ok(run([tmp_path / "a[0-9].csv"], out, tpl, "--input-glob"))
    assert [r["id"] for r in input_columns(out, "id")] == ["10", "11", "20", "21"]
    result = run([tmp_path / "zz*.csv"], tmp_path / "out" / "none.parquet", tpl, "--input-glob")
    assert result.exit_code == 2 and "no file matches" in one_error_line(result.stderr)
    result = run([tmp_path / "zz*.csv"], tmp_path / "out" / "none.parquet", tpl)  # literal: no such file
    assert result.exit_code == 2 and "not found" in one_error_line(result.stderr) and "--input-glob" in result.stderr
    # An output the pattern would match is refused.
    result = run([tmp_path / "a*.csv"], tmp_path / "a9.csv", tpl, "--input-glob")
    assert result.exit_code == 2 and "matches the --input-glob pattern" in one_error_line(result.stderr)


# ---- stdin, compressed and tab-separated files --------------------------------------------------------
@pytest.mark.parametrize("kind", ["csv", "jsonl", "csv.gz", "jsonl.gz"])
def test_stdin_is_read_and_resumes_with_the_same_stdin(tmp_path: Path, tpl: Path, kind: str) -> None:
    if kind.startswith("csv"):
        data = b"id,text\n1,one\n2,two\n"
    else:
        data = b'{"id": 1, "text": "one"}\n{"id": 2, "text": "two"}\n'
    if kind.endswith(".gz"):  # `curl ... | batchllm run -`: gzipped stdin is read as a .gz file would be
        def compress(b: bytes) -> bytes:
            return gzip.compress(b, mtime=0)  # the same stream twice (the header holds a timestamp)
    else:
        def compress(b: bytes) -> bytes:
            return b
    out = tmp_path / "out.jsonl"
    ok(run(["-"], out, tpl, stdin=compress(data)))
    assert [r["text"] for r in input_columns(out, "text")] == ["one", "two"]
    again = run(["-"], out, tpl, stdin=compress(data))
    ok(again)
    assert "already finished" in again.stderr
    changed = run(["-"], out, tpl, stdin=compress(data.replace(b"two", b"TWO")))
    ok(changed)
    assert "different job (changed: input content)" in changed.stderr
    assert [r["text"] for r in input_columns(out, "text")] == ["one", "TWO"]


def test_gzip_csv_and_tsv(tmp_path: Path, tpl: Path) -> None:
    plain = write_csv(tmp_path / "src.csv", rows(3))
    gz = tmp_path / "in.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    ok(run([gz], tmp_path / "gz.parquet", tpl))
    assert input_columns(tmp_path / "gz.parquet", "id", "text") == rows(3)
    # A tab-separated file whose text holds commas: the tab is the delimiter, never sniffed.
    tsv_rows = [{"id": "1", "text": "a, b, c"}, {"id": "2", "text": "d,e"}]
    tsv = write_csv(tmp_path / "in.tsv", tsv_rows, delimiter="\t")
    ok(run([tsv], tmp_path / "tsv.parquet", tpl))
    assert input_columns(tmp_path / "tsv.parquet", "id", "text") == tsv_rows


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_json_lines(tmp_path: Path, tpl: Path, compression: str) -> None:
    path = tmp_path / ("in.jsonl.gz" if compression == "gzip" else "in.jsonl.zst")
    duckdb.connect().execute(
        f"COPY (SELECT range AS id, 'row ' || range AS text FROM range(3)) TO '{path}' "
        f"(FORMAT json, COMPRESSION {compression})"
    )
    out = tmp_path / "out.parquet"
    ok(run([path], out, tpl))
    assert input_columns(out, "id", "text") == [{"id": i, "text": f"row {i}"} for i in range(3)]


def test_inputs_that_cannot_be_one_table_are_refused_before_the_model(tmp_path: Path, tpl: Path, no_model: None) -> None:
    csv_file = write_csv(tmp_path / "a.csv", rows(1))
    (tmp_path / "b.jsonl").write_text('{"id": "1", "text": "x"}\n')
    (tmp_path / "c.csv.zst").write_bytes(b"")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "d.parquet")
    semicolons = write_csv(tmp_path / "e.csv", rows(1), delimiter=";")
    cases = [
        ([csv_file, semicolons], [], "different delimiters: "),
        ([csv_file, tmp_path / "b.jsonl"], [], "a.csv is csv, "),
        ([tmp_path / "c.csv.zst"], [], "zstd-compressed CSV is not supported"),
        (["-", csv_file], [], "cannot be combined"),
        ([tmp_path / "d.parquet"], ["--encoding", "latin-1"], "--encoding applies to CSV/TSV input only"),
        ([csv_file], ["--encoding", "klingon"], "not an encoding Python knows"),
        (["ftp://host/a.csv"], [], "unknown URL scheme 'ftp'"),
        (["s3://bucket/a*.csv"], [], "add --input-glob"),
    ]
    for inputs, flags, message in cases:
        result = run(inputs, tmp_path / "out.parquet", tpl, *flags, stdin=b"")
        assert result.exit_code == 2, (inputs, result.output)
        assert message in one_error_line(result.stderr), (inputs, result.stderr)
    assert not (tmp_path / "out.parquet").exists()


# ---- URLs ---------------------------------------------------------------------------------------------
def _httpfs_loads() -> bool:
    try:
        duckdb.connect().execute("LOAD httpfs")
        return True
    except duckdb.Error:
        return False


@pytest.mark.skipif(not _httpfs_loads(), reason="DuckDB's httpfs extension is not installed (INSTALL needs network)")
def test_https_url_through_a_local_server(tmp_path: Path, tpl: Path) -> None:
    served = tmp_path / "served"
    write_csv(served / "in.csv", rows(3))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "out.parquet"
        ok(run([f"http://127.0.0.1:{server.server_address[1]}/in.csv"], out, tpl))
        assert input_columns(out, "id", "text") == rows(3)
    finally:
        server.shutdown()


@pytest.mark.skipif(_httpfs_loads(), reason="httpfs is installed here: the URL is read, not refused")
def test_url_without_httpfs_is_one_line_naming_the_url(tmp_path: Path, tpl: Path) -> None:
    for url in ("s3://bucket/data/in.csv", "https://127.0.0.1:9/in.csv"):
        result = run([url], tmp_path / "out.parquet", tpl)
        assert result.exit_code == 2
        line = one_error_line(result.stderr)
        assert f"Cannot read {url}: DuckDB's httpfs extension is not installed" in line  # never s3:/bucket
    assert not (tmp_path / "out.parquet").exists()


# ---- --where, --columns, --encoding -------------------------------------------------------------------
def test_where_and_columns_select_rows_and_columns(tmp_path: Path, tpl: Path) -> None:
    data = [{"id": str(i), "lang": "en" if i % 2 else "fr", "text": f"t{i}", "extra": "x"} for i in range(6)]
    inp = write_csv(tmp_path / "in.csv", data)
    out = tmp_path / "out.parquet"
    ok(run([inp], out, tpl, "--where", "lang = 'en' AND CAST(id AS INTEGER) > 1", "--columns", "id,text"))
    table = read_table(out)
    assert table.column_names[:2] == ["id", "text"] and "lang" not in table.column_names
    assert table.select(["id", "text"]).to_pylist() == [{"id": "3", "text": "t3"}, {"id": "5", "text": "t5"}]


def test_row_numbers_count_the_rows_kept_by_where(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"i": i, "n": 0 if i == 5 else 1, "text": f"t{i}"}) + "\n" for i in range(6)))
    tpl = tmp_path / "t.j2"
    tpl.write_text("{{ text }} {{ 10 // n }}")  # n == 0 (i == 5) fails rendering
    out = tmp_path / "out.parquet"
    result = run([inp], out, tpl, "--where", "i > 2", "--summary", "-")
    assert result.exit_code == 3, result.output
    assert [r["i"] for r in input_columns(out, "i")] == [3, 4, 5]
    assert [e["row"] for e in json.loads(result.stdout)["first_errors"]] == [2]  # i == 5 is the third row kept
    errors = [json.loads(x) for x in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == [2]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--where", "lang = "], "--where 'lang = '"),
        (["--where", "nope = 'x'"], "nope"),
        (["--where", "id > 3"], "CAST(col AS INTEGER)"),
        (["--where", "id"], "not true/false"),
        (["--where", "true) UNION SELECT 1 --"], "--where"),
        (["--columns", "id,nope"], "--columns: 'nope' is not a column of the input"),
        (["--columns", "text", "--id-column", "id"], "--id-column 'id' is left out by --columns; add it there"),
    ],
)
def test_bad_where_or_columns_is_a_usage_error_before_the_model(
    tmp_path: Path, tpl: Path, no_model: None, flags: list[str], message: str
) -> None:
    inp = write_csv(tmp_path / "in.csv", rows(2))
    result = run([inp], tmp_path / "out.parquet", tpl, *flags)
    assert result.exit_code == 2
    assert message in one_error_line(result.stderr)
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_encoding(tmp_path: Path, tpl: Path, encoding: str) -> None:
    text = "São Paulo, café" + (" €" if encoding == "cp1252" else "")
    inp = write_csv(tmp_path / "in.csv", [{"id": "1", "text": text}], encoding=encoding)
    refused = run([inp], tmp_path / "o.parquet", tpl)
    assert refused.exit_code == 2 and "Invalid unicode" in one_error_line(refused.stderr)
    assert "--encoding" in one_error_line(refused.stderr)  # the fix, not only --skip-bad-rows
    out = tmp_path / "out.parquet"
    ok(run([inp], out, tpl, "--encoding", encoding))
    assert input_columns(out, "text") == [{"text": text}]


@pytest.mark.parametrize("content, message", [
    ("utf16", "is UTF-16 text (it starts with a UTF-16 byte-order mark): pass --encoding utf-16"),
    ("parquet", "is a Parquet file, not CSV: pass --input-format parquet"),
])
def test_a_csv_file_that_is_something_else_is_named_with_the_fix(tmp_path: Path, tpl: Path, content: str,
                                                                  message: str) -> None:
    # DuckDB read either as one garbled column name: "contains a NUL character ...; rename it".
    inp = tmp_path / "in.csv"
    if content == "utf16":
        inp.write_text("id,text\n1,x\n", encoding="utf-16")
    else:
        pq.write_table(pa.table({"id": ["1"], "text": ["x"]}), inp)
    refused = run([inp], tmp_path / "o.parquet", tpl)
    assert refused.exit_code == 2 and message in one_error_line(refused.stderr)
    fixed = ["--encoding", "utf-16"] if content == "utf16" else ["--input-format", "parquet"]
    ok(run([inp], tmp_path / "out.parquet", tpl, *fixed))


# ---- the fingerprint -----------------------------------------------------------------------------------
def test_changing_files_where_columns_or_encoding_is_a_different_job(tmp_path: Path, tpl: Path) -> None:
    data = tmp_path / "data"
    write_csv(data / "a.csv", rows(2))
    out = tmp_path / "out.parquet"
    base = ["--where", "id <> '9'", "--columns", "id,text"]
    ok(run([data], out, tpl, *base))
    assert "already finished" in run([data], out, tpl, *base).stderr
    steps = [
        (["--where", "id <> '1'", "--columns", "id,text"], "--where"),
        (["--where", "id <> '1'", "--columns", "text,id"], "--columns"),
        (["--where", "id <> '1'", "--columns", "text,id", "--encoding", "latin-1"], "--encoding"),
    ]
    for flags, changed in steps:
        result = run([data], out, tpl, *flags)
        ok(result)
        assert f"different job (changed: {changed}" in result.stderr, result.stderr
    flags = steps[-1][0]
    write_csv(data / "b.csv", rows(1, 5))  # a new file in the directory
    result = run([data], out, tpl, *flags)
    ok(result)
    assert "changed: input file size" in result.stderr and "input files" in result.stderr
    assert [r["id"] for r in input_columns(out, "id")] == ["0", "5"]


def test_analyze_reads_inputs_the_same_way(tmp_path: Path, tpl: Path) -> None:
    write_csv(tmp_path / "d" / "a.csv", rows(3))
    write_csv(tmp_path / "d" / "b.csv", rows(3, 3))
    result = invoke(["analyze", tmp_path / "d", "-t", tpl, "--where", "id <> '4'", "--columns", "text",
                     "--json", "-"])
    ok(result)
    assert json.loads(result.stdout)["rows"] == 5


def test_rejected_lines_of_several_files_are_one_per_file_and_line(tmp_path: Path) -> None:
    from batchllm_cli.table_io import TableSource

    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text('id,text\n1,ok\n2,"broken\n3,ok\n' if name == "a.csv" else "id,text\n4,ok\n5,x,y\n")
    with TableSource([tmp_path / "a.csv", tmp_path / "b.csv"], skip_bad_rows=True) as src:
        assert src.validate() == 2
        rejects = src.rejects.to_pylist()
    assert [(Path(r["file"]).name, r["line"]) for r in rejects] == [("a.csv", 3), ("a.csv", 4), ("b.csv", 3)]


def test_hive_values_are_decoded_and_utf16_is_read(tmp_path: Path) -> None:
    from batchllm_cli.table_io import InputOptions, TableSource

    for part, ident in (("city=S%C3%A3o Paulo", "1"), ("city=__HIVE_DEFAULT_PARTITION__", "2")):
        write_csv(tmp_path / "hv" / part / "a.csv", [{"id": ident}])
    with TableSource(tmp_path / "hv", options=InputOptions(where="city IS NULL OR city LIKE 'S%'")) as src:
        assert src.validate() == 2
        assert [r for b in src.batches() for r in b.to_pylist()] == [
            {"__batchllm_row_id": 0, "id": "1", "city": "São Paulo"},  # percent-encoded, as Spark writes it
            {"__batchllm_row_id": 1, "id": "2", "city": None},  # Hive's null partition
        ]
    text = [{"id": "1", "text": "café 完璧"}]
    write_csv(tmp_path / "u16.csv", text, encoding="utf-16")
    with TableSource(tmp_path / "u16.csv", options=InputOptions(encoding="utf-16")) as src:
        assert [{k: r[k] for k in ("id", "text")} for b in src.batches() for r in b.to_pylist()] == text


def test_a_killed_directory_job_with_where_resumes_and_a_changed_one_is_refused(tmp_path: Path, env: dict) -> None:
    import cli_process
    from reliability_utils import SEEDED, flat, invoke as invoke_wide, write_rows_csv

    data = tmp_path / "data"
    data.mkdir()
    write_rows_csv(data / "b.csv", 60, start=60)
    write_rows_csv(data / "a.csv", 60)
    tpl = tmp_path / "t.j2"
    tpl.write_text("Say: {{ text }}")
    out = tmp_path / "out" / "result.parquet"
    flags = [*FAST, *SEEDED, "--checkpoint-rows", "20", "--checkpoint-seconds", "1000",
             "--where", "CAST(id AS INTEGER) % 3 <> 0"]

    def args(output: Path, *more: str) -> list[str]:
        return ["run", str(data), "-t", str(tpl), "-o", str(output), *flags, *more]

    code, log = cli_process.run(args(out), {**env, "BATCHLLM_CRASH_AT": "manifest_update:2"})
    assert code == 137, log
    result = invoke_wide(args(out, "--where", "CAST(id AS INTEGER) % 3 <> 1"))
    assert result.exit_code == 4 and "changed --where" in flat(result.stderr)
    (data / "c.csv").write_text("id,text\n999,new\n")  # a file added to the input directory
    result = invoke_wide(args(out))
    assert result.exit_code == 4 and "input files" in flat(result.stderr)
    (data / "c.csv").unlink()
    result = invoke_wide(args(out))
    assert result.exit_code == 0, result.output
    assert "Resuming" in result.stderr
    reference = tmp_path / "ref.parquet"
    assert invoke_wide(args(reference)).exit_code == 0
    assert read_table(out).to_pylist() == read_table(reference).to_pylist()
    assert [int(r["id"]) for r in input_columns(out, "id")] == [i for i in range(120) if i % 3]


class _OnFirstRow:
    """A RunObserver that does `act` when the first row finishes (another program touching the input)."""

    def __init__(self, act) -> None:  # noqa: ANN001
        self.act, self.done = act, False

    def notice(self, message: str) -> None:
        pass

    def start(self, total_rows: int, resumed_rows: int, work) -> None:  # noqa: ANN001
        pass

    def advance(self, rows: int, completion_tokens: int) -> None:
        if not self.done:
            self.done = True
            self.act()

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("how", ["file_added", "file_removed", "directory_removed"])
def test_a_directory_input_changed_during_the_run_stops_with_exit_4(tmp_path: Path, tpl: Path, how: str) -> None:
    import shutil

    from batchllm_cli.errors import InputChanged
    from batchllm_cli.job import run_job
    from batchllm_cli.job_types import RunSettings

    data = tmp_path / "data"
    write_csv(data / "a.csv", rows(4))
    write_csv(data / "b.csv", rows(4, 4))
    act = {
        "file_added": lambda: write_csv(data / "c.csv", rows(1, 8)),
        "file_removed": lambda: (data / "b.csv").unlink(),
        "directory_removed": lambda: shutil.rmtree(data),
    }[how]
    settings = RunSettings(input=(str(data),), template=str(tpl), output=tmp_path / "out.parquet", max_tokens=2,
                           kv_cache_memory=16 << 20, chat=False, checkpoint_rows=2)
    with pytest.raises(InputChanged) as info:
        run_job(settings, _OnFirstRow(act))
    expect = {"file_added": "2 file(s) before, 3 now", "file_removed": "2 file(s) before, 1 now",
              "directory_removed": "removed or cannot be read"}[how]
    assert info.value.exit_code == 4 and expect in str(info.value)
    assert not (tmp_path / "out.parquet").exists()
