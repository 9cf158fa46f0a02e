"""Structured output: what an answer must look like (a label set, a regex, a JSON schema), compiled
once per (constraint, model vocabulary) by xgrammar.

xgrammar was chosen over llguidance (bench/grammar_library_compare.py, 32k-token byte-level BPE on
CPU): its per-token mask costs 3-18 us against llguidance's 38-96 us, it brings CPU and CUDA kernels
for applying the bitmask, and a transformers logits processor to check parity against; compiling
takes it longer (1-40 ms against ~1 ms), but that is paid once per job.

The grammar's view of the vocabulary is built from the model directory's tokenizer.json (through a
`transformers` fast-tokenizer wrapper around the `tokenizers` object), so it does not depend on how
engine/tokenizer.py loads its own tokenizer.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.errors import EngineError

ConstraintKind = Literal["choices", "regex", "json_schema"]


class GrammarError(EngineError):
    """A constraint the grammar library cannot compile (a bad regex, an unsupported schema)."""


@dataclass(frozen=True)
class StructuredOutput:
    """One job's constraint on every answer. `value` is the regex, the JSON schema text, or the
    choices as a JSON array of strings (plain, hashable data: it is part of SamplingParams)."""

    kind: ConstraintKind
    value: str

    @staticmethod
    def choices(labels: list[str] | tuple[str, ...]) -> StructuredOutput:
        return StructuredOutput("choices", json.dumps(list(labels), ensure_ascii=False))

    @property
    def labels(self) -> list[str]:
        assert self.kind == "choices"
        return json.loads(self.value)


def _one_line(exc: BaseException) -> str:
    # xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: "; the user needs the rest
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", first)


def _choices_ebnf(labels: list[str]) -> str:
    # a JSON string literal is a valid EBNF string literal for xgrammar (escapes included)
    return "root ::= " + " | ".join(json.dumps(label) for label in labels)


@functools.lru_cache(maxsize=4)
def tokenizer_info(model_dir: str, vocab_size: int, stop_token_ids: tuple[int, ...]) -> Any:
    """xgrammar.TokenizerInfo of a model directory; vocab_size is the model's logits width."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)))
    else:  # a tokenizer given only as Hugging Face files other than tokenizer.json
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))


@functools.lru_cache(maxsize=8)
def _compile(spec: StructuredOutput, model_dir: str, vocab_size: int, stop_token_ids: tuple[int, ...]) -> Any:
    import xgrammar as xgr

    return _compile_with(xgr.GrammarCompiler(tokenizer_info(model_dir, vocab_size, stop_token_ids), cache_enabled=False),
                         spec)


@functools.lru_cache(maxsize=8)
def _compile_for_text(spec: StructuredOutput) -> Any:
    """The grammar without a model's vocabulary (one stop token): for checking whole answers as text."""
    import xgrammar as xgr

    return _compile_with(xgr.GrammarCompiler(xgr.TokenizerInfo(["</s>"], stop_token_ids=[0]), cache_enabled=False),
                         spec)


def answer_matches(spec: StructuredOutput, text: str) -> bool:
    """Whether `text` (its UTF-8 bytes) is one whole value of the constraint: what decoding guarantees
    for an answer that ended at end-of-sequence, but not for one a stop string cut, nor for decoded
    text whose bytes were not valid UTF-8 (~5 us a check)."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(_compile_for_text(spec))
    return bool(matcher.accept_string(text)) and bool(matcher.is_completed())


# xgrammar (0.2.x; mlc-ai/xgrammar#800) writes a string with minLength/maxLength as a bounded repeat of
# this character class, which lets raw control characters in (not JSON: strict parsers refuse the answer)
# and no escape at all. Every use of it is rewritten to one JSON character, as maxLength counts the decoded
# string: an unescaped one, a short escape, a \uXXXX that is no surrogate, or a surrogate pair (a lone
# surrogate is no character).
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_HEX = "[0-9A-Fa-f]"
_JSON_STRING_CHAR = "(" + " | ".join((
    r'[^\0-\x1f\"\\]',
    r'"\\" [\"\\/bfnrt]',
    rf'"\\u" [0-9A-Ca-cE-Fe-f] {_HEX} {_HEX} {_HEX}',
    rf'"\\u" [Dd] [0-7] {_HEX} {_HEX}',
    rf'"\\u" [Dd] [89ABab] {_HEX} {_HEX} "\\u" [Dd] [C-Fc-f] {_HEX} {_HEX}',
)) + ")"
# A string literal or a character class of xgrammar's printed EBNF, read whole (so the same text inside
# a literal, an enum value or a Regex("...") pattern, is never taken for the class).
_EBNF_LITERAL_OR_CLASS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')


def json_schema_grammar(schema: str) -> Any:
    """The xgrammar.Grammar of a JSON schema's answers: one line, no free whitespace (answers are short
    and parse the same everywhere), strings holding only what JSON allows."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    fixed = _EBNF_LITERAL_OR_CLASS.sub(lambda m: _JSON_STRING_CHAR if m[0] == _LOOSE_STRING_CHAR else m[0], text)
    return xgr.Grammar.from_ebnf(fixed)


def _compile_with(compiler: Any, spec: StructuredOutput) -> Any:
    if spec.kind == "choices":
        return compiler.compile_grammar(_choices_ebnf(spec.labels))
    if spec.kind == "regex":
        return compiler.compile_regex(spec.value)
    return compiler.compile_grammar(json_schema_grammar(spec.value))


def compile_constraint(
    spec: StructuredOutput, model_dir: str | Path, vocab_size: int, stop_token_ids: frozenset[int] | tuple[int, ...]
) -> Any:
    """The xgrammar.CompiledGrammar of `spec` for this model; cached, so a job compiles it once
    (the CLI's early check and the engine share the result). Raises GrammarError."""
    if not stop_token_ids:
        raise GrammarError(
            "Structured output needs the model's end-of-sequence token, and none is set in its "
            "config.json, generation_config.json or tokenizer."
        )
    try:
        return _compile(spec, str(model_dir), vocab_size, tuple(sorted(stop_token_ids)))
    except (RuntimeError, ValueError, TypeError) as exc:
        what = {"choices": "--choices", "regex": "--regex", "json_schema": "The JSON schema"}[spec.kind]
        raise GrammarError(f"{what} cannot be compiled into a grammar: {_one_line(exc)}.") from exc
