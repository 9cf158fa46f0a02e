"""What makes two invocations the same job: the fingerprint stored in a run's manifest.json.

A checkpoint may only be resumed by the job that wrote it, otherwise the output silently mixes answers
from two templates, models or inputs. The fingerprint is a flat dict of named fields, so a refusal can
say exactly what changed. Fields that do not change any row's answer (batch sizes, KV cache size,
checkpoint intervals, output file name and format, the answer column's name) are left out on purpose:
changing them between a crash and the resume is allowed (e.g. a smaller --max-batch-tokens after
running out of GPU memory).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from batchllm_cli import __version__

# Fields recorded for information only (shown by `status`), never a reason to refuse a resume: an
# input copied without -p gets a new mtime but the same content.
INFO_FIELDS = frozenset({"input.mtime", "input.identity"})
# The input's own fields: what `input_change` re-checks before the output is written.
_INPUT_SNAPSHOT = ("input.size", "input.mtime", "input.identity", "input.content", "input.files")

# Human names of the fields, for the refusal message.
FIELD_LABELS = {
    "input.path": "input file path",
    "input.size": "input file size",
    "input.content": "input content",
    "input.files": "input files",
    "input.glob": "--input-glob",
    "input.format": "--input-format",
    "input.encoding": "--encoding",
    "input.where": "--where",
    "input.columns": "--columns",
    "input.limit": "--limit",
    "input.skip_bad_rows": "--skip-bad-rows",
    "input.id_column": "--id-column",
    "template": "template text",
    "model.path": "model path",
    "model.files": "model files (config, tokenizer, weights)",
    "chat": "--chat/--no-chat",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "stop": "--stop",
    "ignore_eos": "--ignore-eos",
    "nulls": "--nulls",
    "truncate": "--truncate",
    "dtype": "--dtype",
    "batchllm_version": "batchllm version",
    "structured_output": "structured output (--choices/--regex/--json-schema)",
    "template.variables": "--var",
    "template.params": "--param",
    "system": "--system",
    "truncate_columns": "--truncate-column",
}

# Files of a model directory that change what the model or its tokenizer does. Weights (the files the
# loader reads: engine's weight_files) are identified by name and size (hashing gigabytes on every
# resume would cost minutes); their index by content.
_MODEL_TEXT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "model.safetensors.index.json",
)


# A file changed less than this long before its identity was taken may change again within the same
# timestamp tick (filesystem clocks tick in milliseconds, FAT in 2 s), unseen: its identity is not trusted.
_SETTLED_NS = 3_000_000_000


def file_identity(path: Path) -> tuple[int, int, int, int, int] | None:
    """(size, mtime_ns, ctime_ns, inode, device) of a regular file, or None when there is none.

    While it is unchanged the file's bytes are unchanged: every write, truncation or replacement
    changes the ctime or the inode, and no user-space call sets a ctime back (utime sets atime and
    mtime only). So a hash taken between two equal identities stands for the file until it changes,
    provided the file had settled (see `settled_identity`).
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def settled_identity(path: Path) -> tuple[int, int, int, int, int] | None:
    """file_identity, or None when the file changed too recently for its ctime to tell a later change
    apart (git's "racily clean" problem)."""
    ident = file_identity(path)
    if ident is None or time.time_ns() - ident[2] < _SETTLED_NS:
        return None
    return ident


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """blake2b-256 of a file's bytes, streamed."""
    h = hashlib.blake2b(digest_size=32)
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def model_files_digest(model_dir: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    for name in _MODEL_TEXT_FILES:
        p = model_dir / name
        if p.is_file():
            h.update(f"{name}\0{file_digest(p)}\0".encode())
    from engine import EngineError, weight_files

    try:
        weights = weight_files(model_dir)
    except EngineError:  # no usable weights: check_model_files refused such a directory already
        weights = []
    for p in weights:
        h.update(f"{p.relative_to(model_dir)}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()


def input_snapshot(files: Sequence[Path] | None) -> dict[str, Any]:
    """The fingerprint fields of the input's bytes. One file keeps the fields it always had (a
    checkpoint made before several files were accepted still matches); several files add their paths
    and combine their hashes in order; a URL input (None) has no bytes to check here."""
    if files is None:
        return {"input.size": None, "input.mtime": None, "input.identity": None, "input.content": None}
    sizes, mtimes, identities, digests = 0, 0, [], []
    for path in files:
        before = settled_identity(path)
        digests.append(file_digest(path))
        after = file_identity(path)
        st = path.stat()
        sizes += st.st_size
        mtimes = max(mtimes, st.st_mtime_ns)
        # the identity the content hash belongs to (None if the file changed while it was hashed)
        identities.append(list(after) if after is not None and after == before else None)
    if len(files) == 1:
        return {"input.size": sizes, "input.mtime": mtimes, "input.identity": identities[0], "input.content": digests[0]}
    combined = hashlib.blake2b(digest_size=32)
    for path, digest in zip(files, digests):
        combined.update(f"{path.name}\0{digest}\0".encode())
    return {"input.size": sizes, "input.mtime": mtimes, "input.identity": identities,
            "input.content": combined.hexdigest(), "input.files": [str(p.resolve()) for p in files]}


def build_fingerprint(
    *,
    input_id: str,
    input_files: Sequence[Path] | None,
    limit: int | None,
    skip_bad_rows: bool,
    id_column: str | None,
    template_text: str,
    model_dir: Path,
    chat: bool,
    sampling: Mapping[str, Any],
    nulls: str,
    truncate: str | None,
    dtype: str,
    structured_output: Mapping[str, Any] | None = None,
    prompt: Mapping[str, Any] | None = None,
    reading: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`input_id` names the input (a resolved path, `-`, a URL); `input_files` are the files whose bytes
    the job reads (stdin's spool included; None for a URL); `reading` the --where/--columns/... fields."""
    fp: dict[str, Any] = {
        "input.path": input_id,
        **input_snapshot(input_files),
        **dict(reading or {}),  # each absent when default, so older checkpoints still match
        "input.limit": limit,
        "input.skip_bad_rows": skip_bad_rows,
        "input.id_column": id_column,
        "template": template_text,
        "model.path": str(model_dir.resolve()),
        "model.files": model_files_digest(model_dir),
        "chat": chat,
        "nulls": nulls,
        "truncate": truncate,
        "dtype": dtype,
        "batchllm_version": __version__,
    }
    for key in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop"):
        value = sampling[key]
        fp[key] = list(value) if isinstance(value, tuple) else value
    # Only when on: a run directory made before the flag existed still matches a run without it.
    if sampling.get("ignore_eos"):
        fp["ignore_eos"] = True
    if structured_output is not None:  # absent when unconstrained, so older checkpoints still match
        fp["structured_output"] = dict(structured_output)
    fp.update(prompt or {})  # --var, --param, --system, --truncate-column: only those set (PromptOptions)
    return fp


def normalized(fp: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(dict(fp)))


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Names of the compared fields that differ (a field missing on one side counts as changed)."""
    a, b = normalized(old), normalized(new)
    keys = [k for k in list(b) + [k for k in a if k not in b] if k not in INFO_FIELDS]
    return [k for k in dict.fromkeys(keys) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], fields: list[str]) -> str:
    parts = []
    a, b = normalized(old), normalized(new)
    for k in fields:
        label = FIELD_LABELS.get(k, k)
        before, after = a.get(k), b.get(k)
        if k in ("template", "input.content", "model.files", "structured_output") or before is None or after is None:
            parts.append(label)
        else:
            parts.append(f"{label} ({_short(before)} -> {_short(after)})")
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def digest_of(fp: Mapping[str, Any]) -> str:
    compared = {k: v for k, v in normalized(fp).items() if k not in INFO_FIELDS}
    return hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest()



def input_change(input_files: Path | Sequence[Path] | None, fp: Mapping[str, Any]) -> str | None:
    """What changed in the input since `fp` was taken (None: the same bytes). `input_files` is the input
    listed again now (a file added to a directory input is a change). A changed mtime alone is no change
    (the content hash decides); a changed size needs no hashing, an unchanged identity none either."""
    if isinstance(input_files, (str, os.PathLike)):
        input_files = [Path(input_files)]
    if input_files is None or fp.get("input.content") is None:
        return None  # a URL: its bytes were never hashed
    names = [str(p.resolve()) for p in input_files]
    if len(input_files) != 1 or "input.files" in fp:
        before = fp.get("input.files") or []
        if names != before:
            return f"its files changed ({len(before)} file(s) before, {len(names)} now)"
    try:
        size = sum(p.stat().st_size for p in input_files)
    except OSError:
        return "it was removed or cannot be read"
    if size != fp["input.size"]:
        return f"its size went from {fp['input.size']} to {size} bytes"
    idents = [file_identity(p) for p in input_files]
    known = fp.get("input.identity")
    if len(input_files) == 1:
        known = [known]
    if known is not None and all(i is not None and k == list(i) for i, k in zip(idents, known)):
        return None  # unchanged since hashed (see file_identity): no need to read them again
    try:
        if input_snapshot(input_files)["input.content"] != fp["input.content"]:
            return "its content was rewritten (same size)"
    except OSError:
        return "it cannot be read any more"
    return None
