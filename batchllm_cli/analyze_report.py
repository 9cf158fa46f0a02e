"""Rendering an AnalyzeReport: the human report (rich on a TTY, plain lines otherwise), JSON, progress,
and writing report files; the HTML page is analyze_html.py. No analysis happens here."""
from __future__ import annotations

import json
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from batchllm_cli.analyze_types import AnalyzeReport
from batchllm_cli.progress import print_notice


# ---- helpers --------------------------------------------------------------------------------------
def one_line(text: str) -> str:
    """Whitespace runs (newlines included) as single spaces: a prompt shown on one line."""
    return " ".join(text.split())


INHERITED_CONTEXT = 32  # characters shown of the prefix a top prefix extends


def split_prefix(text: str, new_text: str) -> tuple[str, str]:
    """A shared prefix's decoded text as (the shorter shared prefix it extends, its own new text);
    all new when the two decodings do not line up."""
    if new_text and text.endswith(new_text):
        return text[: len(text) - len(new_text)], new_text
    return "", text


def branch_text(text: str, new_text: str, width: int) -> tuple[str, str]:
    """A shared prefix on one line in about `width` characters, as (inherited, new): `new` is its own
    text past the shorter shared prefix it extends, `inherited` the end of that shorter prefix. Cut
    from the front, never the new part's start or end: prefixes nested in one another all open
    alike, siblings differ where their new text starts, and the rows under a prefix branch where
    it ends."""
    flat = one_line(text)
    inherited = one_line(split_prefix(text, new_text)[0])
    if not flat.startswith(inherited):
        inherited = ""
    new = flat[len(inherited):]
    if len(flat) <= width:
        return inherited, new
    room = width - 1  # the leading "…"
    if len(new) <= room:
        # A little of what is inherited says where the new part goes on; more would only repeat
        # the same words on every line of siblings.
        context = min(room - len(new), INHERITED_CONTEXT)
        return "…" + inherited[len(inherited) - context:].lstrip(), new
    lead = "…" if inherited else ""
    head = max(8, (width - len(lead) - 3) // 3)
    tail = max(8, width - len(lead) - 3 - head)
    return lead, f"{new[:head].rstrip()} … {new[-tail:].lstrip()}"


def pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def failures_line(r: AnalyzeReport) -> str:
    if not r.rows_failed:
        return ""
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in r.failures.items())
    # `rows` beside it counts the rows planned: say what the input had, as --json's `rows` does
    return f"of {r.rows:,} in the input; {r.rows_failed:,} without a prompt ({kinds})"


def group_line(stats: Any) -> str:
    if not stats.shared_groups:
        return f"no rows share a whole KV block; {stats.plain_rows:,} rows run on their own"
    n = stats.shared_groups
    if stats.min_size == stats.max_size:
        sizes = f"{stats.min_size:,} rows each" if n > 1 else f"{stats.min_size:,} rows"
    else:
        sizes = f"{stats.min_size:,}–{stats.max_size:,} rows, median {stats.median_size:,.0f}"
    line = f"{n:,} group{'s' if n != 1 else ''} sharing a prefix ({sizes})"
    if stats.plain_rows:
        line += f"; {stats.plain_rows:,} rows share no whole KV block with another"
    return line


def _histogram_line(stats: Any) -> str:
    parts = []
    for lo, hi, count in stats.histogram:
        label = f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
        parts.append(f"{label}: {count:,}")
    return "  ".join(parts)


# ---- human report ---------------------------------------------------------------------------------
DEMO_TOKENIZER_NOTE = (
    "note: token counts are the built-in demo model's tokenizer's, not your model's; "
    "pass --model DIR or --tokenizer DIR."
)


def render_text(r: AnalyzeReport, console: Console) -> None:
    """The report on `console`: rich tables on a terminal, plain aligned lines otherwise."""
    tty = console.is_terminal
    table_box = box.SIMPLE_HEAD if tty else None
    bold = "bold" if tty else ""

    chat = "on" if r.chat else "off"
    console.print(Text(
        f"analyze: {r.input} with template {r.template}; tokenizer {r.tokenizer_dir} (chat template {chat})"
    ))
    if r.demo_model:
        console.print(Text(DEMO_TOKENIZER_NOTE, style="yellow" if tty else ""))
    facts = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    facts.add_column(style=bold)
    facts.add_column(justify="right")
    facts.add_column()
    failed = failures_line(r)
    facts.add_row("rows", f"{r.rows_planned:,}", Text(failed, style="yellow" if tty else ""))
    facts.add_row("prompt tokens", f"{r.prompt_tokens:,}", f"longest prompt {r.max_prompt_tokens:,}")
    facts.add_row("unique prompt tokens", f"{r.unique_prompt_tokens:,}", "prefix-tree tokens: the least prefill possible")
    facts.add_row("sharing ratio", pct(r.sharing_ratio), "1 - unique / prompt tokens")
    facts.add_row("groups", f"{r.groups.shared_groups:,}", group_line(r.groups))
    if r.groups.shared_groups > 1:
        facts.add_row("group sizes", "", _histogram_line(r.groups))
    console.print(facts)

    cmp = Table(
        title=f"Prefill work (KV block {r.block_size} tokens)", title_justify="left", box=table_box,
        title_style=bold, header_style=bold, pad_edge=False,
    )
    cmp.add_column("strategy")
    cmp.add_column("prefill tokens", justify="right")
    cmp.add_column("saved", justify="right")
    for key, label, tokens in r.comparison():
        style = "bold green" if tty and key == "plan" else ""
        cmp.add_row(Text(label, style=style), Text(f"{tokens:,}", style=style), Text(pct(r.saved_fraction(tokens)), style=style))
    console.print(cmp)

    if r.top_prefixes:
        _render_top_prefixes(r, console)
    for e in r.first_errors:
        who = f"row {e.row}" + (f" (id {e.id})" if r.has_ids else "")
        console.print(Text(f"  {who}: {e.error}", style="red" if tty else ""))
    if r.rows_failed > len(r.first_errors):
        console.print(Text(f"  ... and {r.rows_failed - len(r.first_errors):,} more rows without a prompt"))
    if r.rows_truncated:
        console.print(Text(f"truncated: {r.rows_truncated:,} prompts were cut to fit the model's context"))
    if r.rows_rejected:
        console.print(Text(f"rejected: {r.rows_rejected:,} malformed input lines were skipped"))
    console.print(Text(
        f"planned {r.rows_planned:,} rows {r.plan_mode} in {r.total_s:.1f} s (tokenize {r.tokenize_s:.1f} s, "
        f"of which LRU simulation {r.lru_s:.1f} s; plan {r.plan_s:.1f} s; report {r.report_s:.1f} s)"
    ))


def _render_top_prefixes(r: AnalyzeReport, console: Console) -> None:
    """One line per prefix, laid out here rather than by a rich Table, which fits a narrow console by
    cutting the text's end: where prefixes differ. Each text keeps its new part whole where it can
    (bold on a terminal) after the end of what it inherits (dim)."""
    tty = console.is_terminal
    heads = ("#", "rows", "tokens", "new", "saved")
    cells = [(str(i), f"{p.rows:,}", f"{p.tokens:,}", f"{p.new_tokens:,}", f"{p.saved_tokens:,}")
             for i, p in enumerate(r.top_prefixes, 1)]
    widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(heads)]

    def numbers(values: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) for v, w in zip(values, widths)) + "  "

    # Off a terminal (a file, a pipe) the console's width is a guess: give the text room anyway.
    used = len(numbers(heads))
    width = max(console.width - used, 20 if tty else 100)
    console.print(Text(
        f"Top {len(r.top_prefixes)} shared prefixes (text: the end of the shorter prefix each extends, "
        "then its own new part; … marks text left out)", style="bold" if tty else "",
    ))
    console.print(Text(numbers(heads) + "text", style="bold" if tty else ""), no_wrap=True, overflow="ignore")
    for p, values in zip(r.top_prefixes, cells):
        inherited, new = branch_text(p.text, p.new_text, width)
        line = Text(numbers(values)) + Text(inherited, style="dim" if tty else "") + Text(new, style="bold" if tty else "")
        console.print(line, no_wrap=True, overflow="ignore", crop=False)  # never cut off the end


def report_json(r: AnalyzeReport) -> str:
    return json.dumps(r.to_dict(), indent=2, ensure_ascii=False) + "\n"


# ---- progress -------------------------------------------------------------------------------------
class AnalyzeProgress:
    """Rows tokenized of total: a live bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, console: Console, every_s: float = 10.0) -> None:
        self.console = console
        self.every_s = every_s
        self.total = 0
        self.rows = 0
        self._t0 = self._last = 0.0
        self._bar: Progress | None = None
        self._task: Any = None

    def notice(self, message: str) -> None:
        print_notice(message, self.console)

    def start(self, total_rows: int) -> None:
        self.total = total_rows
        self._t0 = self._last = time.monotonic()
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]tokenize"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("tokenize", total=total_rows)

    def advance(self, rows: int) -> None:
        self.rows += rows
        if self._bar is not None:
            self._bar.update(self._task, advance=rows)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            rate = self.rows / max(now - self._t0, 1e-9)
            self.console.print(f"analyze: tokenized {self.rows:,}/{self.total:,} rows, {rate:,.0f} rows/s")

    def phase(self, name: str) -> None:
        if name.startswith("plan"):
            self._stop_bar()
            self.console.print(f"analyze: {name} ...")

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def finish(self) -> None:
        self._stop_bar()


# ---- output files ---------------------------------------------------------------------------------
def write_report_file(path: str, text: str) -> None:
    """`text` to `path` (report_files.write_report: '-' is stdout); OutputError when it cannot."""
    from batchllm_cli.errors import OutputError
    from batchllm_cli.report_files import write_report

    try:
        write_report(path, text)
    except OSError as exc:
        raise OutputError(f"Cannot write {path}: {exc.strerror or exc}") from exc
