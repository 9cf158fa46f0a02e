"""The model's own tokenizer: batch encoding, chat template, EOS ids, decoding.

Only tokenizers and chat templates come from `transformers`; the engine never runs a transformers model.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from itertools import chain
from typing import Sequence

import numpy as np

from engine.errors import ModelLoadError


def _int_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return []


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


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


class Tokenizer:
    """Wraps a Hugging Face fast tokenizer loaded from a local model directory."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        except Exception as exc:  # transformers raises many types here; the user needs one sentence
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ModelLoadError(
                f"Could not load a tokenizer from {self.model_dir}: {reason}. The model directory needs "
                "tokenizer.json (or the files of a Hugging Face tokenizer)."
            ) from exc
        template = getattr(self._tok, "chat_template", None)
        template_file = self.model_dir / "chat_template.jinja"
        # Where the chat template came from, for messages (transformers reads chat_template.jinja too).
        self.chat_template_origin = template_file if template_file.is_file() else self.model_dir / "tokenizer_config.json"
        if not template and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
            self._tok.chat_template = template
        self.chat_template: str | None = template or None
        self.eos_token_ids: frozenset[int] = frozenset(self._find_eos_ids())

    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        ids.update(_int_list(_read_json(self.model_dir / "generation_config.json").get("eos_token_id")))
        config = _read_json(self.model_dir / "config.json")
        ids.update(_int_list(config.get("eos_token_id")))
        ids.update(_int_list(config.get("text_config", {}).get("eos_token_id")))
        ids.update(_int_list(self._tok.eos_token_id))
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
        backend = getattr(self._tok, "_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        shrink = _normalizer_shrink(spec.get("normalizer"))
        unbounded = _unknowns_may_fuse(spec.get("model") or {}) or not _keeps_every_character(spec.get("pre_tokenizer"))
        if shrink is None or unbounded:
            return None
        longest = max((len(token.encode("utf-8")) for token in self._tok.get_vocab()), default=1)
        return shrink * max(longest, 1)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, user_message: str) -> str:
        """The prompt text for one user turn, ending where the assistant's answer starts."""
        assert self.chat_template is not None
        return self._tok.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )

    def check_chat_template(self) -> None:
        """ModelLoadError naming the template's file when the chat template cannot render one user turn
        (a Jinja syntax error, or an error the template raises itself): found before any row runs."""
        try:
            self.apply_chat_template("Hello")
        except Exception as exc:  # jinja2 errors, transformers' raise_exception, type errors in the template
            reason = " ".join(str(exc).split()) or type(exc).__name__
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if isinstance(line, int) else ""
            raise ModelLoadError(
                f"The chat template in {self.chat_template_origin}{where} cannot be used: {reason}; fix it, "
                "or pass --no-chat to send prompts without it."
            ) from exc

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text; the fast tokenizer encodes the batch in parallel."""
        if not texts:
            return []
        out = self._tok(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in out]

    def encode_batch_packed(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """The same token ids as `encode_batch`, packed: (tokens int32 (total,), lengths int64 (n,)).

        Goes straight to the fast (Rust) tokenizer's batch encoder, parallel and without computing
        character offsets, and never builds one Python list of ints for the whole batch: this is
        the path for tokenizing whole tables (`batchllm analyze`).
        """
        n = len(texts)
        if n == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        backend = getattr(self._tok, "_tokenizer", None)
        # A tokenizer.json may carry truncation or padding settings, which transformers switches off
        # for a plain call; then (or for a slow tokenizer) take the transformers path itself.
        direct = (
            backend is not None
            and hasattr(backend, "encode_batch")
            and getattr(backend, "truncation", None) is None
            and getattr(backend, "padding", None) is None
        )
        if not direct:
            ids = self.encode_batch(texts, add_special_tokens=add_special_tokens)
        else:
            texts = list(texts)
            fast = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.21: no offsets
            encs = (fast or backend.encode_batch)(texts, add_special_tokens=add_special_tokens)
            ids = [e.ids for e in encs]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
        tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return tokens, lengths

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)
