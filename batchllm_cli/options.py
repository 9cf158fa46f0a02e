"""Command-line options defined once and shared by every command that means the same thing by them.

`run` uses most of them; `analyze` reuses INPUT (and the reading options of input_options.py), --template, --model, --chat/--no-chat, --limit,
--max-tokens, --block-size, --id-column, --skip-bad-rows, --nulls and --truncate, so the flags cannot
drift apart between commands.
"""
from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

# Help panels group the long option list of `run` in --help.
PANEL_JOB = "Job"
PANEL_SAMPLING = "Sampling"
PANEL_ENGINE = "Engine"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class PrefixSharing(str, Enum):
    plan = "plan"
    lru = "lru"
    none = "none"


class AttentionBackend(str, Enum):
    auto = "auto"
    torch = "torch"
    triton = "triton"


_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    # Bare K/M/G are binary, as in most memory flags (docker, JVM).
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_size(value: str | int) -> int:
    """Bytes from `2GiB`, `512MB`, `1.5G` or a plain byte count."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise typer.BadParameter(f"{value!r} is not a size; use e.g. 2GiB, 512MB or a number of bytes.")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise typer.BadParameter("the size must be positive.")
    return size


# ---- shared by run and analyze ------------------------------------------------------------------
InputArg = Annotated[
    list[str],  # str, not Path: pathlib would fold s3://bucket to s3:/bucket
    typer.Argument(
        help="Input table: one or more .csv, .tsv, .parquet, .json (array or lines), .jsonl or .ndjson files "
        "(CSV/TSV/JSON may be .gz), a directory of them (hive key=value directories become columns), "
        "'-' for stdin, or an s3://, gs:// or https:// URL.",
        metavar="INPUT",
        show_default=False,
    ),
]


TemplateOpt = Annotated[
    str,
    typer.Option(
        "--template",
        "-t",
        metavar="FILE|RECIPE",
        help="Jinja2 prompt template file, or a recipe name (see `batchllm recipes`). "
        "Variables are input columns (see also --var, --param).",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--model",
        "-m",
        metavar="DIR",
        help="Hugging Face model directory (config.json, safetensors, tokenizer). "
        "Default: a built-in random-weight demo model.",
        show_default=False,
    ),
]
ChatOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--chat/--no-chat",
        metavar="",
        help="Wrap each prompt in the model's chat template. Default: on when the model has one.",
        show_default=False,
    ),
]
LimitOpt = Annotated[
    Optional[int],
    typer.Option("--limit", metavar="N", help="Use only the first N rows of the input.", min=0, show_default=False),
]

# ---- run ------------------------------------------------------------------------------------------
OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        metavar="FILE",
        help="Output table; format from the extension: .parquet, .csv, .jsonl, .ndjson or .json (JSON lines).",
        show_default=False,
    ),
]
ColumnOpt = Annotated[
    str,
    typer.Option(
        "--column",
        metavar="NAME",
        help="Name of the answer column; the other new columns start with it "
        "(NAME_finish_reason, NAME_prompt_tokens, NAME_completion_tokens, NAME_error).",
        rich_help_panel=PANEL_JOB,
    ),
]
SummaryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--summary",
        help="Write the run's summary as one line of JSON to FILE, or to stdout with '-' (also when the run "
        "is interrupted or fails): state, exit_code, times, this attempt's and the whole job's counts.",
        metavar="FILE|-",
        show_default=False,
        rich_help_panel=PANEL_JOB,
    ),
]
class LogFormat(str, Enum):
    text = "text"
    json = "json"


QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress lines or bar on stderr (notes, errors and the final "
                 "report still go there).", rich_help_panel=PANEL_JOB),
]
LogFormatOpt = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        help="Progress on stderr: 'text' (a bar on a terminal, timestamped lines elsewhere) or 'json' (one "
        "JSON object per line, for log pipelines: progress, notes, the final report and an ending error).",
        rich_help_panel=PANEL_JOB,
    ),
]
MaxTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-tokens",
        metavar="N",
        help="Most tokens generated per row. Default: the recipe's default, else 256.",
        min=1,
        show_default=False,
        rich_help_panel=PANEL_SAMPLING,
    ),
]
TemperatureOpt = Annotated[
    float,
    typer.Option("--temperature", metavar="T", help="Sampling temperature; 0 (or anything below 1e-5) is greedy.", min=0.0, rich_help_panel=PANEL_SAMPLING),
]
TopPOpt = Annotated[
    float,
    typer.Option("--top-p", metavar="P", help="Nucleus sampling mass in (0, 1]; 1 is off.", rich_help_panel=PANEL_SAMPLING),
]
TopKOpt = Annotated[
    int,
    typer.Option("--top-k", metavar="K", help="Sample among the K most likely tokens; 0 is off.", min=0, rich_help_panel=PANEL_SAMPLING),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed",
        metavar="N",
        help="Random seed; a row's sample depends only on (seed, row), not on its batch.",
        rich_help_panel=PANEL_SAMPLING,
    ),
]
StopOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--stop",
        metavar="TEXT",
        help="Stop generating a row at this string (repeatable).",
        show_default=False,
        rich_help_panel=PANEL_SAMPLING,
    ),
]
IgnoreEosOpt = Annotated[
    bool,
    typer.Option(
        "--ignore-eos",
        help="Keep generating past the model's end-of-text token until --max-tokens (--stop still "
        "applies); for benchmarks that need equal output lengths.",
        rich_help_panel=PANEL_SAMPLING,
    ),
]
DeviceOpt = Annotated[
    Device,
    typer.Option("--device", help="Where the model runs.", case_sensitive=False, rich_help_panel=PANEL_ENGINE),
]
DTypeOpt = Annotated[
    DType,
    typer.Option(
        "--dtype", case_sensitive=False, rich_help_panel=PANEL_ENGINE,
        help="Weight and activation dtype. auto: bfloat16 on a GPU; on a CPU, bfloat16 for a bfloat16 or "
        "float16 checkpoint where the CPU computes bfloat16 natively (AMX or AVX-512 BF16), else float32.",
    ),
]
KVCacheMemoryOpt = Annotated[
    Optional[int],
    typer.Option(
        "--kv-cache-memory",
        help="KV cache size, e.g. 2GiB, 512MB or bytes. Default: chosen for the device.",
        parser=parse_size,
        metavar="SIZE",
        show_default=False,
        rich_help_panel=PANEL_ENGINE,
    ),
]
MaxBatchTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-batch-tokens",
        metavar="N",
        help="Token budget of one engine step (decode tokens + prefill chunks). Default: engine's.",
        min=1,
        show_default=False,
        rich_help_panel=PANEL_ENGINE,
    ),
]
PrefixSharingOpt = Annotated[
    PrefixSharing,
    typer.Option(
        "--prefix-sharing",
        help="plan: compute every shared prefix once from a global plan of the rows (default); lru: an "
        "online engine's automatic prefix cache (hashed blocks, LRU eviction, table order); none: every "
        "prompt in full. Outputs are the same; only the work differs.",
        case_sensitive=False,
        rich_help_panel=PANEL_ENGINE,
    ),
]
PlanChunkTokensOpt = Annotated[
    int,
    typer.Option(
        "--plan-chunk-tokens",
        metavar="N",
        help="plan: the whole job is planned at once and fed to the engine N prompt tokens at a time, cut "
        "where the fewest tokens are shared (the prefix shared across a cut is carried over, not computed "
        "again). Lower it to save host memory.",
        min=1,
        rich_help_panel=PANEL_ENGINE,
    ),
]
AttentionBackendOpt = Annotated[
    AttentionBackend,
    typer.Option(
        "--attention-backend",
        help="torch: PyTorch reference attention; triton: Triton kernels (CUDA); auto: triton on CUDA, "
        "torch on CPU.",
        case_sensitive=False,
        rich_help_panel=PANEL_ENGINE,
    ),
]
GpuMemoryUtilizationOpt = Annotated[
    float,
    typer.Option(
        "--gpu-memory-utilization",
        metavar="FRACTION",
        help="CUDA without --kv-cache-memory: the share of the GPU's total memory batchllm may use; the KV "
        "cache gets what the weights, a profiled step and memory already in use leave of it.",
        min=0.01,
        max=1.0,
        rich_help_panel=PANEL_ENGINE,
    ),
]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option(
        "--workers",
        metavar="N",
        help="Run the job on N engine replicas through Ray (pip install 'batchllm[ray]'): one per GPU, or a "
        "share of the CPU cores each. The plan is partitioned by prefix group; each replica commits into the "
        "one checkpoint, which must be on a filesystem every Ray node sees.",
        min=1,
        rich_help_panel=PANEL_ENGINE,
    ),
]
RayAddressOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray-address",
        metavar="ADDR",
        help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one; "
        "--workers defaults to its GPU count.",
        rich_help_panel=PANEL_ENGINE,
    ),
]
CudaGraphsOpt = Annotated[
    bool,
    typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="CUDA with the triton backend: replay decode-only steps from captured CUDA graphs (faster for "
        "small models); --no-cuda-graphs runs every step eagerly.",
        rich_help_panel=PANEL_ENGINE,
    ),
]
BlockSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--block-size",
        metavar="N",
        help="Tokens per KV cache block. Default: engine's.",
        min=1,
        show_default=False,
        rich_help_panel=PANEL_ENGINE,
    ),
]

# ---- row identity, bad input and checkpoints (run; --id-column is meant to be shared with analyze) ---
PANEL_INPUT = "Input and bad rows"
PANEL_CHECKPOINT = "Checkpoints and resume"


class NullPolicy(str, Enum):
    error = "error"
    empty = "empty"


class TruncateSide(str, Enum):
    left = "left"
    right = "right"


IdColumnOpt = Annotated[
    Optional[str],
    typer.Option(
        "--id-column",
        metavar="COL",
        help="Column whose values identify rows (unique, not null; checked before the model loads). "
        "Seeds each row's sampling and names rows in the errors file. Default: the row's position.",
        show_default=False,
        rich_help_panel=PANEL_INPUT,
    ),
]
SkipBadRowsOpt = Annotated[
    bool,
    typer.Option(
        "--skip-bad-rows",
        help="CSV: skip malformed records (wrong column count, bad quoting or encoding) and list them in "
        "OUTPUT.rejects.jsonl, instead of failing before the model loads; the run then exits 3.",
        rich_help_panel=PANEL_INPUT,
    ),
]
MaxRejectsOpt = Annotated[
    int,
    typer.Option(
        "--max-rejects",
        metavar="N",
        min=0,
        help="With --skip-bad-rows: fail before the model loads (exit 2) when more than N records are "
        "malformed (0: none may be).",
        rich_help_panel=PANEL_INPUT,
    ),
]
NullsOpt = Annotated[
    NullPolicy,
    typer.Option(
        "--nulls",
        help="A null value printed by the template: 'error' makes the row an error row, 'empty' renders "
        "it as empty text. A null in an optional variable (| default) always counts as missing.",
        case_sensitive=False,
        rich_help_panel=PANEL_INPUT,
    ),
]
TruncateOpt = Annotated[
    Optional[TruncateSide],
    typer.Option(
        "--truncate",
        help="Cut a whole prompt longer than the model's context minus --max-tokens ('left' drops its start, "
        "instructions and chat turn included; 'right' its end) instead of making the row an error row. "
        "To shorten one long column instead, use --truncate-column.",
        case_sensitive=False,
        show_default=False,
        rich_help_panel=PANEL_INPUT,
    ),
]
CheckpointDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--checkpoint-dir",
        metavar="DIR",
        help="Run directory for committed result shards. Default: OUTPUT.batchllm beside the output. Another "
        "DIR is named in OUTPUT.checkpoint.json while the job is unfinished, so `batchllm status OUTPUT` finds it.",
        show_default=False,
        rich_help_panel=PANEL_CHECKPOINT,
    ),
]
CheckpointRowsOpt = Annotated[
    int,
    typer.Option(
        "--checkpoint-rows",
        metavar="N",
        help="Commit finished rows to the checkpoint at least every N rows.",
        min=1,
        rich_help_panel=PANEL_CHECKPOINT,
    ),
]
CheckpointSecondsOpt = Annotated[
    float,
    typer.Option(
        "--checkpoint-seconds",
        metavar="T",
        help="... and at least every T seconds (a kill loses at most the rows since the last commit); the "
        "first shard after T/12 seconds of results, so `status` has something to show early.",
        min=0.001,
        rich_help_panel=PANEL_CHECKPOINT,
    ),
]
RestartOpt = Annotated[
    bool,
    typer.Option(
        "--restart",
        help="Discard the checkpoint of an earlier run of this output and run every row again, also when "
        "the job had finished (the old output is replaced only once the new one is complete).",
        rich_help_panel=PANEL_CHECKPOINT,
    ),
]
RetryErrorsOpt = Annotated[
    bool,
    typer.Option(
        "--retry-errors",
        help="Run again only the rows in error of a finished or checkpointed job, keeping the other answers "
        "(e.g. after raising --kv-cache-tokens as an error advised).",
        rich_help_panel=PANEL_CHECKPOINT,
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an OUTPUT file that no batchllm job wrote (no OUTPUT.success.json beside it and no "
        "checkpoint); without it such a file is refused. It is replaced only once the new output is complete.",
        rich_help_panel=PANEL_CHECKPOINT,
    ),
]
KeepCheckpointsOpt = Annotated[
    bool,
    typer.Option(
        "--keep-checkpoints",
        help="Keep the run directory after the output is written (default: deleted once the completion "
        "marker OUTPUT.success.json is written).",
        rich_help_panel=PANEL_CHECKPOINT,
    ),
]

# ---- analyze --------------------------------------------------------------------------------------
PANEL_REPORT = "Report"

TokenizerOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--tokenizer",
        metavar="DIR",
        help="Directory with only the tokenizer files (tokenizer.json, tokenizer_config.json) of any model, "
        "also one run cannot load: no weights needed. Instead of --model; with neither, tokens are counted "
        "with the demo model's tokenizer.",
        show_default=False,
    ),
]
KVCacheTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        "--kv-cache-tokens",
        metavar="N",
        help="KV cache capacity in tokens. run: caps the engine's cache (after --kv-cache-memory), so "
        "sharing modes compare at equal memory. analyze: the LRU prefix cache simulated for comparison "
        "(default 262144, about an 8B model's cache on one 80 GB GPU).",
        min=0,
        show_default=False,
        rich_help_panel=PANEL_ENGINE,
    ),
]
TopOpt = Annotated[
    int,
    typer.Option("--top", metavar="N", help="Show the N largest shared prefixes.", min=0, rich_help_panel=PANEL_REPORT),
]
AnalyzeJsonOpt = Annotated[
    Optional[str],
    typer.Option(
        "--json",
        metavar="FILE|-",
        help="Write the report as JSON to FILE, or to stdout with '-' (the text report then goes to stderr).",
        show_default=False,
        rich_help_panel=PANEL_REPORT,
    ),
]
HtmlOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--html",
        metavar="FILE",
        help="Write a self-contained HTML report (numbers and an icicle chart of the prefix tree).",
        show_default=False,
        rich_help_panel=PANEL_REPORT,
    ),
]
OutOfCoreOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--out-of-core/--in-memory",
        metavar="",
        help="Sort the prompts on disk with DuckDB, or in memory with numpy. Default: in memory when the "
        "estimate (4 bytes per token + 1 KB per row) fits in half the available memory.",
        show_default=False,
        rich_help_panel=PANEL_ENGINE,
    ),
]

# ---- status ---------------------------------------------------------------------------------------
StatusTargetArg = Annotated[
    Path,
    typer.Argument(
        help="The run's output file (as given to --output), or its run directory.",
        metavar="OUTPUT|RUN_DIR",
        show_default=False,
    ),
]
StatusJsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the status as JSON on stdout instead of text."),
]

# ---- structured output (run and analyze) ----------------------------------------------------------
PANEL_STRUCTURED = "Structured output"
ChoicesOpt = Annotated[
    Optional[str],
    typer.Option(
        "--choices",
        metavar="A,B,C|@FILE",
        help="Every answer is exactly one of these labels (comma-separated, or @FILE with one per line). "
        "Default: the recipe's labels (classify).",
        show_default=False,
        rich_help_panel=PANEL_STRUCTURED,
    ),
]
RegexOpt = Annotated[
    Optional[str],
    typer.Option(
        "--regex",
        metavar="PATTERN",
        help="Every answer matches this regular expression (the whole answer).",
        show_default=False,
        rich_help_panel=PANEL_STRUCTURED,
    ),
]
JsonSchemaOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--json-schema",
        metavar="FILE",
        help="Every answer is JSON valid for this JSON Schema; each top-level property also becomes a typed "
        "column COLUMN_PROPERTY. Default: the recipe's schema (extract).",
        show_default=False,
        rich_help_panel=PANEL_STRUCTURED,
    ),
]

# ---- prompt building (run, analyze and render) -----------------------------------------------------
PANEL_PROMPT = "Prompt"
VarOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--var",
        metavar="NAME=COLUMN",
        help="The template variable NAME reads the column COLUMN (repeatable), e.g. --var text=body to use "
        "a recipe on a table without a text column.",
        show_default=False,
        rich_help_panel=PANEL_PROMPT,
    ),
]
ParamOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--param",
        "-p",
        metavar="NAME=VALUE",
        help="The template variable NAME is the text VALUE in every row (repeatable), e.g. "
        "-p labels='spam, ham'. Every row is also the variable row: {{ row[\"customer-name\"] }}.",
        show_default=False,
        rich_help_panel=PANEL_PROMPT,
    ),
]
SystemOpt = Annotated[
    Optional[str],
    typer.Option(
        "--system",
        metavar="TEXT|@FILE",
        help="A system message before each prompt in the model's chat template (@FILE: a file's text). "
        "Needs a model with a chat template and --chat on.",
        show_default=False,
        rich_help_panel=PANEL_PROMPT,
    ),
]
TruncateColumnOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--truncate-column",
        metavar="COL",
        help="When a prompt does not fit the model's context minus --max-tokens, cut this column's text (by "
        "tokens, from its end) until it fits; the rest of the prompt stays whole (repeatable; the longest "
        "column is cut first).",
        show_default=False,
        rich_help_panel=PANEL_PROMPT,
    ),
]

# ---- render ----------------------------------------------------------------------------------------
RenderJsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object per row (row, prompt, tokens) instead of text."),
]
RecipeNameArg = Annotated[
    Optional[str],
    typer.Argument(help="Print this recipe: its metadata and template. Without it: list the recipes.",
                   metavar="[NAME]", show_default=False),
]
