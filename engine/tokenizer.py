"""The model's own tokenizer: batch encoding, chat template, EOS ids, decoding.

`tokenizer.json` is loaded with the `tokenizers` library and chat templates are rendered with jinja2
(engine/chat_template.py), with the semantics of transformers' fast tokenizers (checked token for
token against transformers by tests/test_tokenizer_parity.py), without importing transformers:
that import alone took seconds of a short job's start. A model directory without tokenizer.json
(only a slow tokenizer's files) goes through transformers once, to convert it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.errors import ModelLoadError

# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES): added to the vocabulary as special
# tokens and passed to chat templates as strings.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_ids(value: object, path: Path, key: str) -> list[int]:
    """An eos_token_id as config files write it (one id, a list of ids, or null); anything else is
    refused naming the file, not dropped or crashed on."""
    ids = [v for v in (value if isinstance(value, list) else [value]) if v is not None]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
        raise ModelLoadError(
            f"{path}: {key} is {value!r}, not a token id or a list of token ids; fix {path.name} "
            "(or download the model again)."
        )
    return ids


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # bad JSON, bad UTF-8, or an integer past Python's digit limit
        raise ValueError(f"{path.name} is not readable JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _model_json(path: Path) -> dict:
    """_read_json for the model's own files (config.json, generation_config.json): an unreadable one
    is a ModelLoadError naming it."""
    try:
        return _read_json(path)
    except OSError as exc:
        raise ModelLoadError(f"Could not read {path}: {exc}.") from exc
    except ValueError as exc:  # raised from the JSON decoder's error
        raise ModelLoadError(
            f"{path} is not readable JSON ({exc.__cause__ or exc}); fix {path.name} (or download the model again)."
        ) from exc


# How many characters a normalizer may turn into one; a type missing here may delete characters.
_NORMALIZER_SHRINK = {"NFC": 4, "NFKC": 4, "NFD": 1, "NFKD": 1, "Lowercase": 1, "Prepend": 1}


def _normalizer_shrink(spec: dict | None) -> int | None:
    """Most characters a tokenizer.json normalizer turns into one (1: none), None when unbounded."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers") or []:
            f = _normalizer_shrink(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":
        pattern, content = (spec.get("pattern") or {}).get("String"), spec.get("content")
        if not isinstance(pattern, str) or not isinstance(content, str) or not content:
            return None  # a regex, or a deletion: no bound
        return max(1, -(-len(pattern) // len(content)))
    return _NORMALIZER_SHRINK.get(kind)


# Pre-tokenizers that split text without dropping any of it (Whitespace, BertPreTokenizer and a Split
# whose behavior is "Removed" drop characters).
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"})


def _keeps_every_character(spec: dict | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_keeps_every_character(part) for part in spec.get("pretokenizers") or [])
    return spec.get("type") in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _unknowns_may_fuse(model: dict) -> bool:
    """Whether a run of unknown characters (or a whole unknown word) may become one token."""
    kind = model.get("type")
    if kind == "BPE":
        return model.get("unk_token") is not None and bool(model.get("fuse_unk")) and not model.get("byte_fallback")
    if kind == "Unigram":
        return not model.get("byte_fallback")
    return True  # WordPiece, WordLevel: one [UNK] per unknown word


def _token_text(value: object) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(model_dir: Path, config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... : tokenizer_config.json, filled in by the legacy special_tokens_map.json."""
    named = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_NAMES}
    legacy = _read_json(model_dir / "special_tokens_map.json")
    for key in SPECIAL_TOKEN_NAMES:
        if named[key] is None and key in legacy:
            named[key] = _token_text(legacy[key])
    return {k: v for k, v in named.items() if v is not None}


def _chat_template(model_dir: Path, config: dict) -> tuple[str | None, str | None]:
    """(the chat template's text, None), or (None, why the model's template cannot be used): its
    templates are several and none is named "default" (said once a prompt needs it: with --no-chat
    the model still runs)."""
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8"), None
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if named and "default" not in named:
            return None, (
                f"{model_dir / 'tokenizer_config.json'} has several chat templates "
                f"({', '.join(repr(name) for name in named)}) and none named "
                "'default'; add a \"default\" entry to its chat_template list, or run with --no-chat."
            )
        template = named.get("default")
    return (template if isinstance(template, str) and template else None), None


# The files transformers builds a slow tokenizer from: SentencePiece models, BPE and WordPiece vocabularies.
_SLOW_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


def _load_backend(model_dir: Path) -> Any:
    """A `tokenizers.Tokenizer` for the directory."""
    from tokenizers import Tokenizer as RustTokenizer

    path = model_dir / "tokenizer.json"
    if path.is_file():
        return RustTokenizer.from_file(str(path))
    present = {name for name in _SLOW_TOKENIZER_FILES if (model_dir / name).is_file()}
    # Said here: transformers' own messages (install sentencepiece or tiktoken) point elsewhere.
    if not present:
        raise ModelLoadError(
            f"The model directory {model_dir} has no tokenizer (tokenizer.json, or tokenizer.model with the "
            "sentencepiece package); copy the tokenizer files from the model's repository."
        )
    readers = ("sentencepiece", "tiktoken")  # transformers falls back to tiktoken for a tokenizer.model
    if present <= {"tokenizer.model", "spiece.model"} and not any(map(importlib.util.find_spec, readers)):
        raise ModelLoadError(
            f"The model directory {model_dir} has a SentencePiece tokenizer ({', '.join(sorted(present))}) but no "
            "tokenizer.json, and reading it needs the sentencepiece package: pip install sentencepiece (or copy "
            "tokenizer.json from the model's repository)."
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # a slow tokenizer only: convert it once, here
    from transformers.utils import logging as hf_logging

    # Its warnings (several lines each, on stderr) would come before our own one-line error.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    backend = getattr(hf, "_tokenizer", None)
    if backend is None:
        raise ValueError("transformers could not convert it to a fast tokenizer")
    return backend


def _apply_transformers_setup(backend: Any, special: dict[str, str]) -> None:
    """What transformers' fast tokenizer does to tokenizer.json on load: named special tokens become
    special added tokens; truncation and padding are off for a plain call. (transformers 5 leaves
    tokenizer.json's post-processor alone whatever add_bos_token/add_eos_token say.)"""
    from tokenizers import AddedToken

    backend.no_truncation()
    backend.no_padding()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])


class Tokenizer:
    """The fast (Rust) tokenizer of a local model directory."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model_dir = Path(model_dir)
        try:
            config = _read_json(self.model_dir / "tokenizer_config.json")
            self.special_tokens: dict[str, str] = _special_tokens(self.model_dir, config)
            self._tok = _load_backend(self.model_dir)
            _apply_transformers_setup(self._tok, self.special_tokens)
            self.chat_template: str | None
            self.chat_template, self._chat_template_unusable = _chat_template(self.model_dir, config)
            # transformers' decode cleans " ." -> "." etc. when asked, except for BPE models
            self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces")) and (
                type(self._tok.model).__name__ != "BPE"
            )
        except ModelLoadError:
            raise
        except Exception as exc:  # tokenizers and transformers raise many types here; the user needs one sentence
            reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
            raise ModelLoadError(
                f"Could not load a tokenizer from {self.model_dir}: {reason}. The model directory needs "
                "tokenizer.json (or the files of a Hugging Face tokenizer)."
            ) from exc
        template_file = self.model_dir / "chat_template.jinja"
        # Where the chat template came from, for messages.
        self.chat_template_origin = template_file if template_file.is_file() else self.model_dir / "tokenizer_config.json"
        self.eos_token_ids: frozenset[int] = frozenset(self._find_eos_ids())

    def _find_eos_ids(self) -> set[int]:
        generation_path, config_path = self.model_dir / "generation_config.json", self.model_dir / "config.json"
        ids = set(_token_ids(_model_json(generation_path).get("eos_token_id"), generation_path, "eos_token_id"))
        config = _model_json(config_path)
        ids.update(_token_ids(config.get("eos_token_id"), config_path, "eos_token_id"))
        text_config = config.get("text_config")
        if isinstance(text_config, dict):
            ids.update(_token_ids(text_config.get("eos_token_id"), config_path, "text_config.eos_token_id"))
        elif text_config is not None:  # null: none, as transformers reads it
            raise ModelLoadError(
                f"{config_path}: text_config is {text_config!r}, not an object; fix config.json (or download the "
                "model again)."
            )
        eos = self.special_tokens.get("eos_token")
        eos_id = self._tok.token_to_id(eos) if eos is not None else None
        if eos_id is not None:
            ids.add(eos_id)
        return ids

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """No token covers more characters of the text given to `encode_batch` than this, or None when
        the tokenizer has no such bound (it may turn arbitrarily many characters into one token).

        A token covers at most as many bytes of the normalized text as its vocabulary string has UTF-8
        bytes (byte-level aliases, `▁` pieces and `<0x41>` byte tokens all spell at least the bytes
        they stand for), and a character is at least one byte. A Unicode composing normalizer (NFC,
        NFKC) turns at most 4 characters into 1; normalizers and pre-tokenizers that delete
        characters, and unknown characters fused into one <unk>, leave no bound.
        """
        spec = json.loads(self._tok.to_str())
        shrink = _normalizer_shrink(spec.get("normalizer"))
        unbounded = _unknowns_may_fuse(spec.get("model") or {}) or not _keeps_every_character(spec.get("pre_tokenizer"))
        if shrink is None or unbounded:
            return None
        longest = max((len(token.encode("utf-8")) for token in self._tok.get_vocab()), default=1)
        return shrink * max(longest, 1)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of a token id (None when the tokenizer has no such id)."""
        return self._tok.id_to_token(int(token_id))

    @property
    def has_chat_template(self) -> bool:
        """Whether the model has one (even one that cannot be used: check_chat_template says why)."""
        return self.chat_template is not None or self._chat_template_unusable is not None

    def apply_chat_template(self, user_message: str, system: str | None = None) -> str:
        """The prompt text for one user turn (after a system turn, when `system` is given), ending
        where the assistant's answer starts."""
        from engine.chat_template import render_chat

        if self._chat_template_unusable is not None:
            raise ModelLoadError(self._chat_template_unusable)
        assert self.chat_template is not None
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": user_message})
        return render_chat(self.chat_template, messages, self.special_tokens, add_generation_prompt=True)

    def token_ends(self, text: str) -> list[int]:
        """The character offset in `text` where each of its tokens ends (encoded alone, without
        special tokens): its first k tokens cover text[:max(ends[:k])]."""
        return [end for _, end in self._tok.encode(text, add_special_tokens=False).offsets]

    def _encode_ids(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        # tokenizers >= 0.21 has encode_batch_fast: parallel, no character offsets
        encode = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]

    def check_chat_template(self, system: str | None = None) -> None:
        """ModelLoadError naming the template's file when the chat template cannot render one user turn
        (after `system`, when given; a Jinja syntax error, or an error the template raises itself, such
        as a template without a system role): found before any row runs."""
        if self._chat_template_unusable is not None:
            raise ModelLoadError(self._chat_template_unusable)
        try:
            self.apply_chat_template("Hello", system=system)
        except Exception as exc:  # jinja2 errors, transformers' raise_exception, type errors in the template
            reason = " ".join(str(exc).split()) or type(exc).__name__
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if isinstance(line, int) else ""
            fix = "drop --system (put its text in the template)" if system is not None else "fix it"
            raise ModelLoadError(
                f"The chat template in {self.chat_template_origin}{where} cannot be used"
                f"{' with a system message' if system is not None else ''}: {reason}; {fix}, "
                "or pass --no-chat to send prompts without it."
            ) from exc

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text; the fast tokenizer encodes the batch in parallel."""
        if not texts:
            return []
        return self._encode_ids(list(texts), add_special_tokens)

    def encode_batch_packed(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """The same token ids as `encode_batch`, packed: (tokens int32 (total,), lengths int64 (n,)).

        Never builds one Python list of ints for the whole batch: this is the path for tokenizing
        whole tables (`batchllm analyze`).
        """
        n = len(texts)
        if n == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        ids = self._encode_ids(list(texts), add_special_tokens)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
        tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return tokens, lengths

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def decode(self, token_ids: Sequence[int]) -> str:
        text = self._tok.decode(list(token_ids), skip_special_tokens=True)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _clean_up_tokenization(text: str) -> str:
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text
