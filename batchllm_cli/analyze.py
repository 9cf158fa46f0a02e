"""The `analyze` job as a library call: settings in, AnalyzeReport out; the CLI only renders it.

What it does (DESIGN.md, "The prefix plan"): every row is rendered and tokenized exactly as `run`
would (same template rules, chat template, special tokens, context limit and --truncate), the token
ids go to the engine's prefix planner, and the report says how much prefill work is shared and what
each strategy (no sharing, an LRU prefix cache in table order, BatchLLM's single-level plan, our
plan) would compute.

Scale: rows stream from the table in batches; each batch is rendered, batch-encoded by the fast
tokenizer into packed int32 arrays, fed to the LRU simulation (which needs table order anyway) and
appended to a spool file in a temporary directory. No Python list of ints ever holds more than one
batch. Once every row is tokenized the total is known exactly, and the plan is made

- in memory (numpy sort, `plan_prefixes`) when its memory estimate fits the budget (token_spool.choose_sort,
  the choice `run` makes too): the spool is read back as one int32 array; or
- out of core when it does not: DuckDB (table_io.token_sort) sorts the spool, spilling to the
  temporary directory, and the sorted batches stream into `plan_prefixes_from_sorted_stream`, which
  keeps only O(rows) state in memory.

`--in-memory` / `--out-of-core` override the choice. Either way only a few hundred rows are read
back at the end to decode the reported prefixes to text.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchllm_cli.analyze_types import (
    AnalyzeObserver,
    AnalyzeReport,
    AnalyzeSettings,
    IcicleNode,
    PreparedAnalyze,
    RowError,
    TopPrefix,
)
from batchllm_cli.collector import OutputColumns
from batchllm_cli.column_names import check_column_names, check_output_names
from batchllm_cli.errors import UsageError
from batchllm_cli.model_setup import (
    DEFAULT_MAX_TOKENS,
    check_room_for_prompt,
    declared_context_length,
    load_tokenizer,
    model_context_length,
    resolve_chat,
    resolve_model,
)
from batchllm_cli.plain_paths import private_dir, temp_writes
from batchllm_cli.prompt_options import check_prompt_columns, load_template
from batchllm_cli.prompts import TRUNCATE_SIDES, FailedRow, PromptEncoder, fit_packed
from batchllm_cli.structured_output import (
    ConstraintFlags,
    check_constraint_compiles,
    checked_typed_fields,
    resolve_constraint,
)
from batchllm_cli.table_io import TableSource
from batchllm_cli.templates import NULL_POLICIES
from batchllm_cli.token_spool import (
    OUT_OF_CORE_BATCH_ROWS,
    OUT_OF_CORE_SORT_MEMORY,
    TokenSpool,
    choose_sort,
)

if TYPE_CHECKING:
    from engine import PrefixPlan

# The LRU cache simulated for comparison when --kv-cache-tokens is not given. The engine sizes its
# cache from the GPU's free memory at load time, which analyze (no GPU, no weights) cannot know;
# 262144 tokens is what an 8B model (128 KiB of bf16 K+V per token) gets from ~32 GiB, about what
# one 80 GB GPU has left after the weights.
DEFAULT_KV_CACHE_TOKENS = 262_144
FIRST_ERRORS = 5


def default_block_size() -> int:
    from engine import EngineConfig

    return int(EngineConfig.__dataclass_fields__["block_size"].default)


class _SilentObserver:
    def notice(self, message: str) -> None:
        pass

    def start(self, total_rows: int) -> None:
        pass

    def advance(self, rows: int) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def finish(self) -> None:
        pass


def _check_settings(s: AnalyzeSettings) -> None:
    if s.model is not None and s.tokenizer is not None:
        raise UsageError("Give --model or --tokenizer, not both.")
    if s.nulls not in NULL_POLICIES:
        raise UsageError(f"--nulls must be one of {', '.join(NULL_POLICIES)}.")
    if s.truncate is not None and s.truncate not in TRUNCATE_SIDES:
        raise UsageError(f"--truncate must be one of {', '.join(TRUNCATE_SIDES)}.")
    if s.block_size is not None and s.block_size < 1:
        raise UsageError("--block-size must be at least 1.")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1.")
    if s.kv_cache_tokens is not None and s.kv_cache_tokens < 0:
        raise UsageError("--kv-cache-tokens must be 0 or more.")
    if s.top < 0:
        raise UsageError("--top must be 0 or more.")
    if s.batch_rows < 1:
        raise UsageError("batch_rows must be at least 1.")


# `run`'s demo notice speaks of answers; here the demo matters because its tokenizer is not the user's.
DEMO_TOKENIZER_NOTICE = (
    "No --model or --tokenizer given: counting tokens with the built-in demo model's tokenizer ({path}), "
    "not your model's; pass --model DIR or --tokenizer DIR for your model's counts."
)


def _tokenizer_dir(settings: AnalyzeSettings, observer: AnalyzeObserver) -> tuple[Path, bool]:
    if settings.tokenizer is not None:
        path = settings.tokenizer
        if not path.exists():
            raise UsageError(f"Tokenizer directory not found: {path}")
        if not path.is_dir():
            raise UsageError(f"--tokenizer must be a directory, not a file: {path}")
        return path, False
    path, demo = resolve_model(settings.model, _SilentObserver())
    if demo:
        observer.notice(DEMO_TOKENIZER_NOTICE.format(path=path))
    return path, demo


def prepare_analyze(settings: AnalyzeSettings, observer: AnalyzeObserver | None = None) -> PreparedAnalyze:
    """Validate the whole invocation before any heavy work; raises UsageError/InputError (exit 2)."""
    observer = observer or _SilentObserver()
    _check_settings(settings)
    source = TableSource(
        settings.input, limit=settings.limit, skip_bad_rows=settings.skip_bad_rows, max_rejects=settings.max_rejects,
        options=settings.reading,
    )
    try:
        check_column_names(source.file_column_names(), source.column_names, None)
        template = load_template(settings.template, settings.nulls, settings.prompt)
        if not source.empty:
            check_prompt_columns(template, settings.prompt, source.column_names)
        recipe = template.source.recipe
        constraint = resolve_constraint(
            ConstraintFlags(settings.choices, settings.regex, settings.json_schema), recipe,
            template.given_variables(source.column_names),
        )
        answer_columns = OutputColumns()  # `run`'s default --column: its typed columns must not clash either
        checked_typed_fields(constraint, answer_columns.prefix, answer_columns.names, source.column_names)
        try:  # `run` with its default --column refuses such an input: say so now, and analyze it anyway
            check_output_names(source.column_names, answer_columns)
        except UsageError as exc:
            observer.notice(f"`run` with its default answer column would stop here: {exc}")
        max_tokens = settings.max_tokens or (recipe.max_tokens if recipe is not None else DEFAULT_MAX_TOKENS)
        total_rows = source.validate()  # a malformed file fails here, naming the line
        if settings.id_column is not None:
            source.check_id_column(settings.id_column)
        tok_dir, demo = _tokenizer_dir(settings, observer)
        # The model's context bounds a prompt (as in `run`). A tokenizer-only directory is not checked
        # as a model `run` can load (any architecture will do); its config.json may still say the context.
        if settings.tokenizer is None:
            context: int | None = model_context_length(tok_dir)
        else:
            context = declared_context_length(tok_dir)
        if context is not None:
            check_room_for_prompt(max_tokens, settings.max_tokens is not None, context)
        tokenizer = load_tokenizer(tok_dir)
        chat = resolve_chat(settings.chat, tokenizer, tok_dir, settings.prompt.system)
        if constraint is not None:
            # With --tokenizer there is no model config to take the vocabulary size from.
            vocab = None if settings.tokenizer is None else tokenizer.vocab_size
            check_constraint_compiles(constraint, tok_dir, tokenizer, vocab_size=vocab)
    except BaseException:
        source.close()
        raise
    return PreparedAnalyze(
        settings=settings,
        source=source,
        template=template,
        tokenizer=tokenizer,
        tokenizer_dir=tok_dir,
        demo_model=demo,
        chat=chat,
        max_tokens=max_tokens,
        block_size=settings.block_size or default_block_size(),
        kv_cache_tokens=DEFAULT_KV_CACHE_TOKENS if settings.kv_cache_tokens is None else settings.kv_cache_tokens,
        total_rows=total_rows,
        context_tokens=context,
    )


class _Failures:
    """Rows that have no prompt: counted by kind, the first few kept with their message."""

    def __init__(self) -> None:
        self.count = 0
        self.by_kind: dict[str, int] = {}
        self.first: list[FailedRow] = []

    def add(self, failed: list[FailedRow]) -> None:
        for f in failed:
            self.count += 1
            self.by_kind[f.kind] = self.by_kind.get(f.kind, 0) + 1
            if len(self.first) < FIRST_ERRORS:
                self.first.append(f)


def _id_lookup(chunks: list[Any]) -> Any:
    import pyarrow as pa

    return pa.chunked_array(chunks) if chunks else None


def _scalar(value: Any) -> Any:
    """A JSON-friendly Python value for an id cell."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def analyze(settings: AnalyzeSettings, observer: AnalyzeObserver | None = None) -> AnalyzeReport:
    """prepare_analyze + run_analyze: the whole job, for library callers."""
    prepared = prepare_analyze(settings, observer)
    try:
        return run_analyze(prepared, observer)
    finally:
        prepared.close()


def run_analyze(prepared: PreparedAnalyze, observer: AnalyzeObserver | None = None) -> AnalyzeReport:
    """Tokenize every row (streamed), plan, and report."""
    observer = observer or _SilentObserver()
    s = prepared.settings
    t0 = time.perf_counter()
    # The spool and the out-of-core sort's spill files: removed below, or after a kill by the next run.
    tmp = private_dir(s.temp_dir)
    try:
        with temp_writes(tmp, "TMPDIR" if s.temp_dir is None else "temp_dir"):  # full: exit 75, not a traceback
            spool = TokenSpool(tmp)
            failures, truncated, id_chunks, lru, lru_s = _tokenize(prepared, spool, observer)
            t1 = time.perf_counter()
            plan, mode, estimate = _plan(prepared, spool, tmp, observer)
            t2 = time.perf_counter()
        observer.phase("report")
        report = _report(prepared, plan, spool, failures, truncated, id_chunks, lru, mode, estimate)
        t3 = time.perf_counter()
        spool.close()
    finally:
        observer.finish()
        shutil.rmtree(tmp, ignore_errors=True)
    return dataclasses.replace(
        report, tokenize_s=t1 - t0, lru_s=lru_s, plan_s=t2 - t1, report_s=t3 - t2, total_s=t3 - t0
    )


def _tokenize(
    prepared: PreparedAnalyze, spool: TokenSpool, observer: AnalyzeObserver
) -> tuple[_Failures, int, list[Any], Any, float]:
    """One pass over the table: render, batch-encode, fit to the context, spool, simulate LRU."""
    from engine import LruPrefixCache, PackedSequences

    s = prepared.settings
    max_prompt = None if prepared.context_tokens is None else prepared.context_tokens - prepared.max_tokens
    encoder = PromptEncoder(prepared.template, prepared.tokenizer, prepared.chat, max_prompt, s.truncate,
                            system=s.prompt.system, truncate_columns=s.prompt.truncate_columns,
                            decoders=prepared.source.json_decoders())
    sim = LruPrefixCache(prepared.block_size, prepared.kv_cache_tokens)
    failures = _Failures()
    truncated = 0
    id_chunks: list[Any] = []
    lru_s = 0.0
    observer.phase("tokenize")
    observer.start(prepared.total_rows)
    for batch in prepared.source.batches(s.batch_rows):
        if s.id_column is not None:
            id_chunks.append(batch.column(s.id_column))
        packed = encoder.encode_packed(batch)
        if max_prompt is not None:
            packed, cut = fit_packed(packed, max_prompt, s.truncate)
            truncated += cut
        failures.add(packed.failed)
        if len(packed.row_ids):
            spool.append(packed.row_ids, packed.tokens, packed.lengths)
            offsets = np.zeros(len(packed.lengths) + 1, dtype=np.int64)
            np.cumsum(packed.lengths, out=offsets[1:])
            # The LRU cache sees requests in table order, so it runs here, batch by batch.
            t = time.perf_counter()
            sim.feed(PackedSequences(packed.tokens, offsets))
            lru_s += time.perf_counter() - t
        observer.advance(batch.num_rows)
    spool.close()
    return failures, truncated, id_chunks, sim.result(), lru_s


def _plan(
    prepared: PreparedAnalyze, spool: TokenSpool, tmp: Path, observer: AnalyzeObserver
) -> tuple[PrefixPlan, str, int]:
    from batchllm_cli.table_io.token_sort import sort_sequences_out_of_core  # imports the engine
    from engine import PackedSequences, plan_prefixes, plan_prefixes_from_sorted_stream

    s = prepared.settings
    row_ids = spool.row_ids
    choice = choose_sort(spool.tokens, len(row_ids), s.memory_budget, s.out_of_core)
    out_of_core = choice.out_of_core
    if out_of_core and not choice.forced:
        observer.notice(
            f"Planning out of core: the in-memory plan needs about {choice.estimate / 2**30:.1f} GiB "
            f"({spool.tokens:,} tokens, {len(row_ids):,} rows), more than the {choice.budget / 2**30:.1f} GiB "
            f"budget; DuckDB sorts on disk in {tmp}."
        )
    common = dict(keys=row_ids, block_size=prepared.block_size, max_tokens=prepared.max_tokens)
    if out_of_core:
        observer.phase("plan (out of core)")
        spill = tmp / "duckdb"
        spill.mkdir()
        sorted_batches = sort_sequences_out_of_core(
            spool.iter_batches(OUT_OF_CORE_BATCH_ROWS),
            memory_limit=OUT_OF_CORE_SORT_MEMORY,
            temp_directory=str(spill),
            threads=os.cpu_count(),
        )
        plan = plan_prefixes_from_sorted_stream(sorted_batches, **common)
    else:
        observer.phase("plan (in memory)")
        seqs = PackedSequences(spool.read_all(), spool.offsets)
        plan = plan_prefixes(seqs, simulate_lru=False, **common)
    return plan, "out-of-core" if out_of_core else "in-memory", choice.estimate


def _decode_prefix(prepared: PreparedAnalyze, spool: TokenSpool, row: int, length: int) -> str:
    if length <= 0:
        return ""
    return prepared.tokenizer.decode(spool.row_prefix(row, length).tolist())


def _span_text(prepared: PreparedAnalyze, spool: TokenSpool, row: int, start: int, end: int) -> str:
    """The text of tokens [start, end) of a row: the difference of two prefix decodings when that is
    clean (so a character split across the span's edge stays whole), else the span decoded alone."""
    ids = spool.row_prefix(row, end).tolist()
    whole = prepared.tokenizer.decode(ids)
    head = prepared.tokenizer.decode(ids[:start]) if start else ""
    if whole.startswith(head):
        return whole[len(head):]
    return prepared.tokenizer.decode(ids[start:])


def _report(
    prepared: PreparedAnalyze,
    plan: PrefixPlan,
    spool: TokenSpool,
    failures: _Failures,
    truncated: int,
    id_chunks: list[Any],
    lru: Any,
    mode: str,
    estimate: int,
) -> AnalyzeReport:
    s = prepared.settings
    engine_report = plan.report(top_k=0, max_nodes=s.icicle_nodes)
    ids = _id_lookup(id_chunks)

    def id_of(row: int) -> Any:
        return _scalar(ids[row].as_py()) if ids is not None else None

    # Ranked by what each prefix adds over its parent, so a few-shot block under a system prompt
    # shows up, and the system prompt followed by one more shared word does not.
    trie, order, keys = plan.trie, plan.sorted.order, plan.keys
    rows, span = trie.rows, trie.span
    saved = (rows - 1) * span
    cand = np.nonzero((rows >= 2) & (span > 0))[0]
    cand = cand[np.lexsort((cand, -saved[cand]))][: s.top]
    top = []
    for v in cand.tolist():
        row = int(order[trie.lo[v]])
        start, end = int(trie.depth_start[v]), int(trie.depth_end[v])
        top.append(TopPrefix(
            text=_decode_prefix(prepared, spool, row, end),
            rows=int(rows[v]),
            tokens=end,
            new_tokens=end - start,
            new_text=_span_text(prepared, spool, row, start, end),
            saved_tokens=int(saved[v]),
            example_row=int(keys[row]),
            example_id=id_of(int(keys[row])),
        ))
    icicle = _icicle(prepared, plan, spool, engine_report.icicle)
    first = tuple(RowError(f.row_id, id_of(f.row_id), f.kind, f.error) for f in failures.first)
    lengths = plan.lengths
    return AnalyzeReport(
        input=prepared.source.path,
        template=prepared.template.source.name,
        tokenizer_dir=str(prepared.tokenizer_dir),
        demo_model=prepared.demo_model,
        chat=prepared.chat,
        block_size=prepared.block_size,
        kv_cache_tokens=prepared.kv_cache_tokens,
        max_tokens=prepared.max_tokens,
        rows=plan.rows + failures.count,
        rows_planned=plan.rows,
        rows_failed=failures.count,
        failures=dict(sorted(failures.by_kind.items())),
        first_errors=first,
        rows_truncated=truncated,
        rows_rejected=prepared.source.rejects.num_rows if prepared.source.rejects is not None else 0,
        prompt_tokens=engine_report.prompt_tokens,
        unique_prompt_tokens=engine_report.unique_prompt_tokens,
        sharing_ratio=engine_report.sharing_ratio,
        max_prompt_tokens=int(lengths.max()) if len(lengths) else 0,
        lru_prefill_tokens=lru.computed_tokens,
        batchllm_prefill_tokens=engine_report.batchllm_prefill_tokens,
        plan_prefill_tokens=engine_report.plan_prefill_tokens,
        groups=engine_report.groups,
        batchllm_groups=engine_report.batchllm_groups,
        decode_saved_reads=engine_report.decode_saved_reads,
        top_prefixes=tuple(top),
        icicle=icicle,
        trie_nodes=plan.trie.num_nodes,
        plan_mode=mode,
        memory_estimate_bytes=estimate,
        tokenize_s=0.0,
        lru_s=0.0,
        plan_s=0.0,
        report_s=0.0,
        total_s=0.0,
        context_tokens=prepared.context_tokens,
        has_ids=s.id_column is not None,
    )


def _icicle(prepared: PreparedAnalyze, plan: PrefixPlan, spool: TokenSpool, nodes: tuple[Any, ...]) -> tuple[IcicleNode, ...]:
    trie = plan.trie
    if trie.num_nodes == 0 or not nodes:
        return ()
    sub = trie.subtree_tokens()
    rows = trie.rows
    kept = {n.node for n in nodes}
    shown_rows = {v: 0 for v in kept}
    shown_tokens = {v: 0 for v in kept}
    for n in nodes:
        if n.parent in kept:
            shown_rows[n.parent] += int(rows[n.node])
            shown_tokens[n.parent] += int(sub[n.node])
    out = []
    for n in nodes:
        v = n.node
        span = int(trie.depth_end[v] - trie.depth_start[v])
        text = _span_text(prepared, spool, n.row, n.depth_start, n.depth_end) if n.row >= 0 and span else ""
        out.append(
            IcicleNode(
                node=v,
                parent=n.parent,
                depth_start=n.depth_start,
                depth_end=n.depth_end,
                rows=n.rows,
                text=text,
                hidden_rows=int(rows[v]) - shown_rows[v],
                hidden_tokens=int(sub[v]) - span - shown_tokens[v],
            )
        )
    return tuple(out)
