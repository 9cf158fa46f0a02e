"""Finding the model for a job and reading what the CLI needs from it (context length, tokenizer,
chat template), without loading weights or importing torch: shared by `run` and `analyze`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from batchllm_cli.durable import disk_full_reason, full_disk_fix
from batchllm_cli.errors import TempFailError, UsageError

if TYPE_CHECKING:
    from engine import Tokenizer

DEFAULT_MAX_TOKENS = 256


class Notifier(Protocol):
    def notice(self, message: str) -> None: ...


DEMO_NOTICE = (
    "No --model given: using the built-in demo model ({path}). It has random weights, so its answers "
    "are gibberish; pass --model DIR (a Hugging Face model directory) for real answers."
)


def _check_model_dir(path: Path) -> None:
    # The cheap checks a user gets wrong most often, before transformers or torch get involved.
    if not path.exists():
        raise UsageError(f"Model directory not found: {path}")
    if not path.is_dir():
        raise UsageError(f"--model must be a model directory, not a file: {path}")
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} has no config.json; --model needs a Hugging Face model directory.")


def resolve_model(model: Path | None, observer: Notifier) -> tuple[Path, bool]:
    """The model directory to use and whether it is the random-weight demo model."""
    if model is not None:
        _check_model_dir(model)
        return model, False
    from engine import ensure_demo_model

    try:
        path = ensure_demo_model()
    except OSError as exc:  # a cron or service HOME that is missing or read-only, a full disk
        where = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
        full = disk_full_reason(exc)
        if full is not None:
            raise TempFailError(f"Cannot write the demo model ({where}); {full_disk_fix(full)} and run again.") from exc
        raise UsageError(
            f"Cannot write the demo model ({where}); set BATCHLLM_CACHE_DIR to a writable directory, or pass "
            "--model DIR."
        ) from exc
    observer.notice(DEMO_NOTICE.format(path=path))
    return path, True


def check_room_for_prompt(max_tokens: int, given: bool, context: int) -> None:
    """UsageError when --max-tokens (given, or the default a user may not know about) fills the
    model's whole context."""
    if context - max_tokens >= 1:
        return
    origin = "" if given else " (the default when --max-tokens is not given)"
    raise UsageError(
        f"--max-tokens {max_tokens}{origin} leaves no room for a prompt in the model's context of {context} "
        "tokens; pass a lower --max-tokens."
    )


def model_context_length(model_dir: Path) -> int:
    """The model's context in tokens, from config.json (no torch, no weights)."""
    from engine import EngineError, load_model_config

    try:
        return int(load_model_config(str(model_dir)).max_position_embeddings)
    except EngineError as exc:
        raise UsageError(str(exc)) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"Cannot read the model's config.json in {model_dir}: {exc}") from exc


def declared_context_length(directory: Path) -> int | None:
    """The context length a tokenizer directory's config.json states, of any architecture (None when
    it has no config.json or states none): `analyze --tokenizer` needs no model batchllm can run."""
    import json

    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"Cannot read {path}: {exc}; fix it or remove it (--tokenizer needs only the tokenizer files).") from exc
    if not isinstance(raw, dict):
        return None
    text_config = raw.get("text_config")
    for config in (raw, text_config if isinstance(text_config, dict) else {}):
        for key in ("max_position_embeddings", "n_positions"):  # n_positions: GPT-2 and its kin
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def load_tokenizer(model_dir: Path) -> Tokenizer:
    from engine import EngineError, Tokenizer

    try:
        return Tokenizer(model_dir)
    except EngineError as exc:
        raise UsageError(str(exc)) from exc


def note_tokens_past_vocabulary(tokenizer: Tokenizer, model_dir: Path, observer: Notifier) -> None:
    """A note when the tokenizer has ids the model has no embedding for (a special token that
    tokenizer.json lacks gets added after its last id): the rows using them will fail, each alone."""
    from engine import load_model_config

    vocab_size = load_model_config(model_dir).vocab_size
    if tokenizer.vocab_size > vocab_size:
        observer.notice(
            f"The tokenizer in {model_dir} has {tokenizer.vocab_size - vocab_size} token(s) past the model's "
            f"vocabulary of {vocab_size} (config.json vocab_size), e.g. {tokenizer.id_to_token(vocab_size)!r}: "
            "rows whose prompts contain them fail; fix the tokenizer files."
        )


def resolve_chat(requested: bool | None, tokenizer: Tokenizer, model_dir: Path, system: str | None = None) -> bool:
    """Whether prompts go through the model's chat template; a template that is used is tried on one
    message (after the --system turn) now, so a broken one is refused before anything runs."""
    if system is not None and requested is False:
        raise UsageError("--system adds a system turn to the chat template, which --no-chat turns off; drop "
                         "one of them (or put the system text in the prompt template).")
    if system is not None and not tokenizer.has_chat_template:
        raise UsageError(f"--system: the model in {model_dir} has no chat template, so there is no system turn "
                         "to put it in; put the text in the prompt template instead.")
    if requested is None:
        requested = tokenizer.has_chat_template
    elif requested and not tokenizer.has_chat_template:
        raise UsageError(f"--chat: the model in {model_dir} has no chat template; use --no-chat.")
    if requested:
        from engine import EngineError

        try:
            tokenizer.check_chat_template(system)
        except EngineError as exc:
            raise UsageError(str(exc)) from exc
    return requested


def check_model_files(model_dir: Path, device: str) -> None:
    """What `run` can find wrong with the model before anything is written or loaded: config.json,
    the weight files (safetensors headers: format, byte ranges, tensor names and shapes against the
    config; no weight is read) and --device cuda without CUDA. One UsageError naming the culprit."""
    from engine import EngineError, check_device, check_weights, load_model_config

    try:
        check_weights(model_dir, load_model_config(model_dir))
        check_device(device)
    except EngineError as exc:
        raise UsageError(str(exc)) from exc
