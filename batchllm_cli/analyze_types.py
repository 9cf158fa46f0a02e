"""What `analyze` takes and gives (the library call is analyze.py, the rendering analyze_report.py and
analyze_html.py): its settings, its observer, the prepared invocation and the typed report."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from batchllm_cli.prompt_options import PromptOptions
from batchllm_cli.table_io import DEFAULT_MAX_REJECTS, InputOptions, TableSource
from batchllm_cli.templates import PromptTemplate

if TYPE_CHECKING:
    from engine import GroupSizeStats, Tokenizer

DEFAULT_TOP = 10
DEFAULT_BATCH_ROWS = 4096
ICICLE_NODES = 240  # trie nodes drawn in the HTML report (the largest by rows)


class AnalyzeObserver(Protocol):
    """What analyze tells its caller while it works (the CLI draws progress from this)."""

    def notice(self, message: str) -> None: ...

    def start(self, total_rows: int) -> None: ...

    def advance(self, rows: int) -> None: ...

    def phase(self, name: str) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class AnalyzeSettings:
    """One `analyze` invocation. None means "the default" (of the recipe, the model or the engine)."""

    input: Path | str | tuple[str, ...]  # INPUT as `run` takes it
    template: str
    model: Path | None = None
    tokenizer: Path | None = None  # a tokenizer-only directory, instead of `model`
    chat: bool | None = None
    limit: int | None = None
    id_column: str | None = None
    skip_bad_rows: bool = False
    max_rejects: int = DEFAULT_MAX_REJECTS
    nulls: str = "error"
    truncate: str | None = None
    max_tokens: int | None = None
    block_size: int | None = None
    kv_cache_tokens: int | None = None
    top: int = DEFAULT_TOP
    icicle_nodes: int = ICICLE_NODES
    out_of_core: bool | None = None  # None: token_spool.choose_sort decides by the memory estimate
    memory_budget: int | None = None  # bytes for the in-memory plan; None: half the available memory
    batch_rows: int = DEFAULT_BATCH_ROWS
    temp_dir: Path | None = None  # spool and DuckDB spill; None: the system's ($TMPDIR)
    choices: str | None = None  # structured output flags: checked as `run` checks them, prompts unchanged
    regex: str | None = None
    json_schema: Path | None = None
    prompt: PromptOptions = PromptOptions()  # --var, --param, --system, --truncate-column
    reading: InputOptions = InputOptions()  # --input-glob, --input-format, --encoding, --where, --columns


@dataclass(frozen=True)
class TopPrefix:
    """A prefix shared by `rows` rows: their first `tokens` tokens, decoded (`text`). The last
    `new_tokens` of them extend the next shorter shared prefix (its parent in the prefix tree);
    computing them once instead of per row saves `saved_tokens` = (rows - 1) * new_tokens. Over all
    shared prefixes these savings add up to prompt_tokens - unique_prompt_tokens."""

    text: str
    rows: int
    tokens: int
    new_tokens: int
    new_text: str  # the last new_tokens tokens, decoded
    saved_tokens: int
    example_row: int  # a row (0-based position in the input) that starts with it
    example_id: Any = None  # that row's --id-column value


@dataclass(frozen=True)
class IcicleNode:
    """A trie node for the chart: tokens [depth_start, depth_end) shared by `rows` rows, `text` is
    that span decoded. `hidden_rows` rows below it continue into nodes not drawn (or end here), with
    `hidden_tokens` unique tokens among them."""

    node: int
    parent: int
    depth_start: int
    depth_end: int
    rows: int
    text: str
    hidden_rows: int
    hidden_tokens: int


@dataclass(frozen=True)
class RowError:
    row: int
    id: Any
    kind: str
    error: str


@dataclass(frozen=True)
class AnalyzeReport:
    """What `analyze` found. Token counts cover the rows that have a prompt (`rows_planned`); rows
    whose template failed or whose prompt does not fit the context are counted in `rows_failed`."""

    input: str
    template: str
    tokenizer_dir: str
    demo_model: bool
    chat: bool
    block_size: int
    kv_cache_tokens: int
    max_tokens: int
    rows: int  # rows read from the input
    rows_planned: int
    rows_failed: int
    failures: dict[str, int]  # kind -> rows
    first_errors: tuple[RowError, ...]
    rows_truncated: int
    rows_rejected: int
    prompt_tokens: int
    unique_prompt_tokens: int  # trie nodes: the least prefill work possible
    sharing_ratio: float  # 1 - unique / prompt
    max_prompt_tokens: int  # longest prompt
    lru_prefill_tokens: int
    batchllm_prefill_tokens: int
    plan_prefill_tokens: int
    groups: GroupSizeStats  # ours
    batchllm_groups: GroupSizeStats
    decode_saved_reads: int
    top_prefixes: tuple[TopPrefix, ...]
    icicle: tuple[IcicleNode, ...]
    trie_nodes: int
    plan_mode: str  # "in-memory" or "out-of-core"
    memory_estimate_bytes: int
    tokenize_s: float  # reading, rendering, tokenizing, spooling, LRU simulation
    lru_s: float  # of which the LRU simulation
    plan_s: float  # sort, prefix tree, groups, order
    report_s: float  # decoding the reported prefixes
    total_s: float
    context_tokens: int | None = None  # the model's context, when known (prompts must fit it)
    has_ids: bool = False  # rows are named by --id-column values (example_id, first_errors[].id)

    @property
    def optimum_prefill_tokens(self) -> int:
        return self.unique_prompt_tokens

    def comparison(self) -> list[tuple[str, str, int]]:
        """(key, label, prefill tokens) for the side-by-side table, worst first."""
        return [
            ("none", "no sharing", self.prompt_tokens),
            ("lru", f"LRU prefix cache, table order ({self.kv_cache_tokens:,}-token KV)", self.lru_prefill_tokens),
            ("batchllm", "BatchLLM single-level plan", self.batchllm_prefill_tokens),
            ("plan", "batchllm plan (ours)", self.plan_prefill_tokens),
            ("optimum", "optimum (unique tokens)", self.optimum_prefill_tokens),
        ]

    def saved_fraction(self, prefill_tokens: int) -> float:
        return 1.0 - prefill_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["groups"] = self.groups.shared_groups
        data["group_sizes"] = dataclasses.asdict(self.groups)
        data["batchllm_groups"] = dataclasses.asdict(self.batchllm_groups)
        for stats in (data["group_sizes"], data["batchllm_groups"]):
            stats["histogram"] = [{"min": lo, "max": hi, "groups": c} for lo, hi, c in stats["histogram"]]
        data["optimum_prefill_tokens"] = self.optimum_prefill_tokens
        data["saved"] = {key: round(self.saved_fraction(tokens), 6) for key, _, tokens in self.comparison()}
        data["top_prefixes"] = [
            {k: v for k, v in dataclasses.asdict(p).items() if k != "example_id" or self.has_ids}
            for p in self.top_prefixes
        ]
        data["first_errors"] = [
            {k: v for k, v in dataclasses.asdict(e).items() if k != "id" or self.has_ids} for e in self.first_errors
        ]
        data["sharing_ratio"] = round(self.sharing_ratio, 6)
        for key in ("tokenize_s", "lru_s", "plan_s", "report_s", "total_s"):
            data[key] = round(data[key], 3)
        data.pop("icicle")
        data.pop("has_ids")
        data["icicle_nodes"] = len(self.icicle)
        return data


@dataclass
class PreparedAnalyze:
    """A validated invocation: input opened and counted, template checked, tokenizer loaded."""

    settings: AnalyzeSettings
    source: TableSource
    template: PromptTemplate
    tokenizer: Tokenizer
    tokenizer_dir: Path
    demo_model: bool
    chat: bool
    max_tokens: int
    block_size: int
    kv_cache_tokens: int
    total_rows: int
    context_tokens: int | None

    def close(self) -> None:
        self.source.close()
