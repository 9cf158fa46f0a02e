"""What INPUT names: the files (or URLs) of the input table, in the order their rows are numbered.

INPUT may be one file, several files (read in the order given), a directory (every file of one format
inside it, in sorted path order, hive `key=value` directories becoming text columns), a pattern with
--input-glob (sorted matches), `-` (stdin, spooled to a private file so it can be read more than once),
or an `s3://`, `gs://` or `https://` URL. Local paths are taken literally: `a*.csv` is a file of that
name unless --input-glob says it is a pattern. URLs never pass through pathlib (which folds `s3://` to
`s3:/`). Nothing here talks to DuckDB; source.py reads what this resolves.
"""
from __future__ import annotations

import codecs
import glob as globbing
import gzip
import os
import re
import shutil
import stat
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence
from urllib.parse import unquote

from batchllm_cli.errors import UsageError
from batchllm_cli.table_io.common import INPUT_FORMATS

# Compressed CSV/JSON DuckDB decompresses itself; CSV is also read by Python (dialect, record counts),
# and Python 3.11 has gzip but no zstd, so zstd is accepted for JSON only.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
FORMAT_CHOICES = ("csv", "tsv", "json", "jsonl", "parquet")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
URL_SCHEMES = ("s3", "gs", "gcs", "r2", "http", "https")
_PATTERN_CHARS = frozenset("*?[{")
# DuckDB's CSV reader decodes these itself (DuckDB 2.0); any other encoding is transcoded first.
DUCKDB_ENCODINGS = {"utf-8": "utf-8", "utf-16": "utf-16", "iso8859-1": "latin-1"}
STDIN = "-"


@dataclass(frozen=True)
class InputOptions:
    """How to read INPUT (--input-glob, --input-format, --encoding, --where, --columns): shared by every
    command that reads a table, and part of a run's fingerprint."""

    glob: bool = False
    format: str | None = None  # one of FORMAT_CHOICES; None: from the file name (stdin: sniffed)
    encoding: str | None = None  # CSV only; None: UTF-8
    where: str | None = None  # a DuckDB boolean expression over the input's columns
    columns: tuple[str, ...] | None = None  # the input columns kept, in this order

    def fingerprint(self) -> dict[str, object]:
        """The options that change which rows or values a job sees (absent when default, so the
        fingerprint of a plain one-file job is what it was before these options existed)."""
        fp: dict[str, object] = {}
        if self.glob:
            fp["input.glob"] = True
        if self.format is not None:
            fp["input.format"] = self.format
        if self.encoding is not None:
            fp["input.encoding"] = python_encoding(self.encoding)
        if self.where is not None:
            fp["input.where"] = self.where
        if self.columns is not None:
            fp["input.columns"] = list(self.columns)
        return fp


@dataclass(frozen=True)
class InputFile:
    name: str  # how messages name it: the user's path or URL
    location: str  # the local path (absolute) or URL DuckDB reads
    is_url: bool = False
    compression: str | None = None
    partitions: tuple[tuple[str, str | None], ...] = ()  # hive key=value directories above it

    @property
    def path(self) -> Path:
        assert not self.is_url, self.name
        return Path(self.location)


@dataclass(frozen=True)
class ResolvedInput:
    label: str  # INPUT as the user wrote it, for messages
    format: str  # csv, tsv, json, jsonl or parquet
    files: tuple[InputFile, ...]
    directories: tuple[Path, ...] = ()  # directory inputs: nothing the job writes may be inside one
    patterns: tuple[str, ...] = ()  # --input-glob patterns: nothing the job writes may match one
    stdin: bool = False
    partition_keys: tuple[str, ...] = ()


def input_args(inp: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """INPUT as a tuple of the user's strings (settings hold one path or several)."""
    if isinstance(inp, (str, os.PathLike)):
        return (os.fspath(inp),)
    return tuple(os.fspath(p) for p in inp)


def is_url(arg: str) -> bool:
    return _URL.match(arg) is not None


def python_encoding(name: str) -> str:
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise UsageError(f"--encoding {name!r} is not an encoding Python knows; use e.g. utf-8, latin-1, cp1252.") from None

def split_format(name: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name: `a.csv.gz` is (csv, gzip); (None, None) if unknown."""
    lower = name.lower()
    compression = None
    for suffix, comp in COMPRESSIONS.items():
        if lower.endswith(suffix):
            compression, lower = comp, lower[: -len(suffix)]
    if lower.endswith(".tsv"):
        return "tsv", compression
    # pathlib's suffix, as the output side reads it (common._format_of): os.path.splitext skips a name's
    # leading dots, so an output written as `....csv` could not be read back
    return INPUT_FORMATS.get(Path(lower).suffix), compression


def _known_suffixes() -> str:
    return ", ".join([*INPUT_FORMATS, ".tsv"]) + " (CSV/TSV/JSON may end in .gz; JSON also .zst)"


def _check_readable_file(path: Path) -> None:
    """UsageError unless `path`, taken literally, is one readable regular file (a symlink to one is)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        hint = " (to read it as a pattern, add --input-glob)" if _PATTERN_CHARS & set(str(path)) else ""
        raise UsageError(f"Input file not found: {path}{hint}") from None
    except OSError as exc:
        raise UsageError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"Input is not a file: {path} is a special file; give a regular file or a directory.")
    if not os.access(path, os.R_OK):
        raise UsageError(f"Cannot read {path}: permission denied.")


def _local_file(path: Path, partitions: tuple[tuple[str, str | None], ...] = ()) -> InputFile:
    _check_readable_file(path)
    return InputFile(str(path), str(path.absolute()), compression=split_format(path.name)[1], partitions=partitions)


def _hidden(name: str) -> bool:
    # Spark, Hive and DuckDB leave _SUCCESS, _metadata and .crc files beside the data.
    return name.startswith((".", "_"))


def _partitions(rel: Path) -> tuple[tuple[str, str | None], ...] | None:
    """The hive key=value directories of a file's path below the input directory (None: not hive)."""
    parts = []
    for segment in rel.parts[:-1]:
        key, eq, value = segment.partition("=")
        if not eq or not key:
            return None
        value = unquote(value)
        parts.append((unquote(key), None if value == "__HIVE_DEFAULT_PARTITION__" else value))
    return tuple(parts)


def _directory_files(directory: Path) -> list[InputFile]:
    found: list[Path] = []
    for root, dirs, names in os.walk(directory, onerror=_raise_walk_error):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        found += [Path(root) / n for n in names if not _hidden(n)]
    found.sort(key=lambda p: p.relative_to(directory).parts)
    if not found:
        raise UsageError(f"Input directory {directory} holds no files; give a directory of input files.")
    hive = [_partitions(p.relative_to(directory)) for p in found]
    keys = {tuple(k for k, _ in h) for h in hive if h is not None}
    if None in hive or len(keys) > 1:
        if any(h for h in hive if h):
            raise UsageError(
                f"Input directory {directory} mixes hive partition directories (key=value) with others or "
                "with other keys; give a directory whose files all sit under the same key=value levels."
            )
        hive = [() for _ in found]
    return [_local_file(p, h or ()) for p, h in zip(found, hive)]


def _raise_walk_error(exc: OSError) -> None:
    raise UsageError(f"Cannot read the input directory {exc.filename}: {exc.strerror or exc}.")


def _glob_files(pattern: str) -> list[InputFile]:
    matches = sorted(p for p in globbing.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise UsageError(f"--input-glob: no file matches {pattern!r}.")
    return [_local_file(Path(p)) for p in matches]


def _spool_stdin(spool: Path, fmt: str | None) -> tuple[InputFile, str]:
    """stdin copied into a private file (its rows are read several times; a run resumed later needs
    the same stdin again), with its format: --input-format, else sniffed from the first byte."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("INPUT '-' reads the table from stdin, but stdin is a terminal or closed; pipe a file in.")
    stream: IO[bytes] = sys.stdin.buffer
    fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)
    with spool.open("rb") as f:
        head = f.read(4096)
    # gzipped text on stdin (`zcat`-less pipes): read it as a .csv.gz / .jsonl.gz file would be
    compression = "gzip" if head.startswith(b"\x1f\x8b") else None
    if compression is not None:
        with gzip_read_errors("stdin"), gzip.open(spool, "rb") as g:
            head = g.read(4096)
    if fmt is None:
        if head.startswith(b"PAR1"):
            fmt = "parquet"
        else:
            first = head.lstrip(b" \t\r\n\xef\xbb\xbf")[:1]
            fmt = "jsonl" if first == b"{" else "json" if first == b"[" else "csv"
    return InputFile("stdin", str(spool), compression=compression), fmt


def _file_format(f: InputFile, forced: str | None) -> str:
    if forced is not None:
        return forced
    fmt, _ = split_format(f.name if not f.is_url else f.name.split("?")[0])
    if fmt is None:
        raise UsageError(
            f"Cannot read {f.name}: unknown file type; use one of {_known_suffixes()}, or give --input-format."
        )
    return fmt


def resolve_input(
    inp: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], options: InputOptions, stdin_spool: Path | None
) -> ResolvedInput:
    """The files INPUT names, checked to exist and to share one format. `stdin_spool` (a private path)
    receives stdin; None when INPUT is not to be read from stdin again (re-listing it for a check)."""
    args = input_args(inp)
    if not args:
        raise UsageError("Give an INPUT table.")
    if options.format is not None and options.format not in FORMAT_CHOICES:
        raise UsageError(f"--input-format must be one of {', '.join(FORMAT_CHOICES)}.")
    label = " ".join(args)
    if STDIN in args:
        if len(args) > 1:
            raise UsageError("INPUT '-' (stdin) cannot be combined with other inputs.")
        assert stdin_spool is not None, "stdin is spooled once, by the TableSource"
        spooled, fmt = _spool_stdin(stdin_spool, options.format)
        return ResolvedInput("stdin", _checked_format(fmt, [spooled]), (spooled,), stdin=True)
    files: list[InputFile] = []
    directories: list[Path] = []
    patterns: list[str] = []
    for arg in args:
        if is_url(arg):
            scheme = _URL.match(arg).group(1).lower()  # type: ignore[union-attr]
            if scheme not in URL_SCHEMES:
                raise UsageError(f"Cannot read {arg}: unknown URL scheme {scheme!r}; use one of {', '.join(URL_SCHEMES)}.")
            # DuckDB globs object-store keys (not http paths, whose `?` starts a query string).
            if not options.glob and scheme not in ("http", "https") and _PATTERN_CHARS & set(arg):
                raise UsageError(f"{arg} has pattern characters (*?[{{); add --input-glob to read it as a pattern.")
            files.append(InputFile(arg, arg, is_url=True, compression=split_format(arg.split("?")[0])[1]))
        elif options.glob:
            patterns.append(os.path.abspath(arg))
            files += _glob_files(arg)
        elif Path(arg).is_dir():
            directories.append(Path(arg))
            files += _directory_files(Path(arg))
        else:
            files.append(_local_file(Path(arg)))
    fmt = _checked_format(options.format, files)
    keys = {tuple(k for k, _ in f.partitions) for f in files}
    if len(keys) > 1:
        raise UsageError(f"The inputs {label} have different hive partition directories; read one partitioned directory at a time.")
    return ResolvedInput(label, fmt, tuple(files), tuple(directories), tuple(patterns),
                         partition_keys=next(iter(keys)) if keys else ())


def _checked_format(forced: str | None, files: Sequence[InputFile]) -> str:
    formats = {f.name: _file_format(f, forced) for f in files}
    kinds = sorted(set(formats.values()))
    if len(kinds) > 1:
        example = ", ".join(f"{next(n for n, k in formats.items() if k == kind)} is {kind}" for kind in kinds)
        raise UsageError(f"The input files are of different formats ({example}); give files of one format.")
    fmt = kinds[0]
    for f in files:
        if f.compression == "zstd" and fmt in ("csv", "tsv"):
            raise UsageError(f"Cannot read {f.name}: zstd-compressed CSV is not supported; use gzip (.gz) or decompress it.")
        if f.compression is not None and fmt == "parquet":
            raise UsageError(f"Cannot read {f.name}: Parquet compresses itself; give the .parquet file uncompressed.")
    return fmt


def open_text(path: Path, encoding: str, compression: str | None, errors: str = "replace") -> IO[str]:
    """A local CSV file as text (decompressed), for the readers that check DuckDB's."""
    if compression == "gzip":
        return gzip.open(path, "rt", encoding=encoding, errors=errors, newline="")
    return path.open("r", encoding=encoding, errors=errors, newline="")


def is_blank(f: InputFile, json: bool = False) -> bool:
    """0 bytes, or only whitespace (an 'empty' file as editors and scripts leave them), or for JSON an
    empty array (`[]`, what a JSON writer leaves for no rows); a URL is not."""
    if f.is_url:
        return False
    with gzip_read_errors(f.name), open_binary(f.path, f.compression) as data:
        head = data.read(4097)
    if len(head) > 4096:
        return False
    body = head.strip(b" \t\r\n\xef\xbb\xbf")
    return not body or (json and body.startswith(b"[") and body.endswith(b"]") and not body[1:-1].strip())


def check_csv_content(f: InputFile, fmt: str, encoding_given: bool) -> None:
    """UsageError when a CSV/TSV file's first bytes say it is something else: a Parquet file named .csv,
    or UTF-16 text (a byte-order mark) read without --encoding; DuckDB would read either as one
    garbled column name (which failed as 'contains a NUL character, rename it')."""
    if f.is_url:
        return
    with gzip_read_errors(f.name), open_binary(f.path, f.compression) as data:
        head = data.read(4)
    if head == b"PAR1":
        raise UsageError(f"{f.name} is a Parquet file, not {fmt.upper()}: pass --input-format parquet "
                         "(or rename it to .parquet).")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") and not encoding_given:
        raise UsageError(f"{f.name} is UTF-16 text (it starts with a UTF-16 byte-order mark): pass --encoding utf-16.")


def open_binary(path: Path, compression: str | None) -> IO[bytes]:
    return gzip.open(path, "rb") if compression == "gzip" else path.open("rb")


@contextmanager
def gzip_read_errors(name: str) -> Iterator[None]:
    """Python's gzip errors while reading `name` (through open_text/open_binary) as the user's one-line
    error: EOFError used to reach click as a bare "Aborted!" (exit 1), BadGzipFile a traceback."""
    try:
        yield
    except EOFError as exc:
        raise UsageError(f"Cannot read {name}: {exc} (the gzip stream ends early: the file is truncated); "
                         "copy or download the whole file again.") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        if str(exc).startswith("Not a gzipped file"):
            raise UsageError(f"Cannot read {name}: {exc} (its name ends in .gz but it is not gzip data); "
                             "rename it without .gz, or compress it with gzip.") from None
        raise UsageError(f"Cannot read {name}: {exc} (the gzip data is damaged); copy or download the file "
                         "again.") from None


def transcode(f: InputFile, encoding: str, target: Path) -> InputFile:
    """A copy of `f` in UTF-8 at `target` (private), for encodings DuckDB cannot decode itself."""
    try:
        with gzip_read_errors(f.name), open_binary(f.path, f.compression) as src, \
                target.open("w", encoding="utf-8", newline="") as out:
            reader = codecs.getreader(encoding)(src, errors="strict")
            while block := reader.read(1 << 20):
                out.write(block)
    except UnicodeDecodeError as exc:
        raise UsageError(f"Cannot read {f.name}: it is not {encoding} ({exc.reason} at byte {exc.start}); check --encoding.") from None
    return InputFile(f.name, str(target), partitions=f.partitions)
