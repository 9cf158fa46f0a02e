"""The per-DFA-state grammar mask cache (engine/mask_cache.py) may only hand out the mask xgrammar would
fill: on random token paths through each constraint, every cached mask is compared with a fresh fill of
the sequence's own matcher, and the regex DFA accepts exactly the strings xgrammar's grammar accepts."""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Callable

import pytest
import torch

from engine.grammar import StructuredOutput, compile_constraint, tokenizer_info
from engine.grammar_mask import host_bias
from engine.mask_cache import StateMaskCache
from engine.model_config import load_model_config
from engine.regex_dfa import DEAD, RegexDfa
from engine.tokenizer import Tokenizer

SPECS = [
    StructuredOutput("regex", r"[A-Z][a-z]+( [a-z]+)*\."),  # the benchmark's free words
    StructuredOutput("regex", r"[A-Z]{2}-\d{1,3}( [a-z]+)?"),  # counted repeats, \d, an optional tail
    StructuredOutput("regex", r"(yes|no|maybe)(, (yes|no)){0,3}"),
    StructuredOutput("regex", r"[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?|n/a"),
    StructuredOutput("regex", r"(a|ab)*?b+c?"),  # overlapping alternatives, a lazy quantifier
    StructuredOutput("regex", "caf\u00e9( [a-z]+)*"),  # a non-ASCII literal: its UTF-8 bytes
    StructuredOutput.choices(["positive", "negative", "neutral", "n/a", "pos"]),
]


@pytest.fixture(scope="module")
def vocab(tiny_model_dir: Callable[[str], Path]) -> tuple[str, int, frozenset[int]]:
    model_dir = tiny_model_dir("llama_gqa")
    return str(model_dir), load_model_config(model_dir).vocab_size, frozenset(Tokenizer(model_dir).eos_token_ids)


def allowed(bitmask: torch.Tensor, vocab_size: int) -> list[int]:
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.reshape(-1)[:vocab_size]).flatten().tolist()


@pytest.mark.parametrize("spec", SPECS, ids=[s.value[:24] for s in SPECS])
def test_cached_mask_equals_a_fresh_fill_on_random_paths(spec: StructuredOutput, vocab) -> None:
    import xgrammar as xgr

    model_dir, vocab_size, eos = vocab
    compiled = compile_constraint(spec, model_dir, vocab_size, eos)
    cache = StateMaskCache.of(spec, tokenizer_info(model_dir, vocab_size, tuple(sorted(eos))))
    assert cache is not None
    fresh = xgr.allocate_token_bitmask(1, vocab_size)
    rng = random.Random(0)
    compared = 0
    for _ in range(60):
        matcher, state = xgr.GrammarMatcher(compiled), cache.dfa.start
        for _ in range(24):
            matcher.fill_next_token_bitmask(fresh, 0)
            slot = cache.slot(state)
            if slot is None:
                cache.put(state, fresh[0], host_bias(fresh, [0], vocab_size)[0])
            else:
                assert torch.equal(cache.masks([slot])[0], fresh[0]), f"state {state}: cached mask differs"
                bias = cache.biases([slot])
                assert bias is not None and torch.equal(bias[0], host_bias(fresh, [0], vocab_size)[0])
                compared += 1
            ids = allowed(fresh[0], vocab_size)
            assert any(t in eos for t in ids) == cache.dfa.accepts_empty(state)  # EOS exactly where it may end
            ids = [t for t in ids if t not in eos]
            if not ids:
                break
            token = rng.choice(ids)
            assert matcher.accept_token(token)
            state = cache.advance(state, [token])
    assert compared >= 200, "too few revisited states: the test compared almost nothing"


@pytest.mark.parametrize("spec", [s for s in SPECS if s.kind == "regex"], ids=lambda s: s.value[:24])
def test_regex_dfa_accepts_what_xgrammar_accepts(spec: StructuredOutput, vocab) -> None:
    import xgrammar as xgr

    model_dir, vocab_size, eos = vocab
    compiled = compile_constraint(spec, model_dir, vocab_size, eos)
    dfa = RegexDfa.of_regex(spec.value)
    assert dfa is not None
    alphabet = sorted(set("".join(c for c in spec.value if c.isprintable())) | set("aZ0 .,-\u00e9\u0663"))
    rng = random.Random(1)
    samples = ["".join(p) for n in range(3) for p in itertools.product(alphabet[:8], repeat=n)]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    samples += ["Abc def.", "AB-12 xy", "yes, no, yes", "3.5e-2", "abab", "bbc", "caf\u00e9 au lait", "AB-\u0663"]
    agreed = 0
    for text in samples:
        matcher = xgr.GrammarMatcher(compiled)
        xgr_accepts = matcher.accept_string(text) and matcher.is_completed()
        state = dfa.step(dfa.start, text.encode("utf-8"))
        assert xgr_accepts == dfa.accepts_empty(state), f"{text!r}: xgrammar {xgr_accepts}, DFA {not xgr_accepts}"
        agreed += xgr_accepts
    assert agreed > 0


@pytest.mark.parametrize("pattern", [r"[^a]+", r"a.b", r"\w+", r"\s", r"^ab$", r"(?i)ab", r"a{,3}", r"(?=a)a",
                                     r"(a)\1", r"[\u00e0-\u00ff]"])
def test_patterns_outside_the_subset_get_no_cache(pattern: str) -> None:
    assert RegexDfa.of_regex(pattern) is None


def test_dfa_reads_bytes_of_a_whole_match() -> None:
    dfa = RegexDfa.of_regex(r"[A-Z][a-z]+( [a-z]+)*\.")
    assert dfa is not None
    in_word = dfa.step(dfa.start, b"Abc")
    assert dfa.step(in_word, b"cd") == in_word  # the same state after any more letters: one cached mask
    assert dfa.accepts_empty(dfa.step(in_word, b" ef."))
    assert dfa.step(in_word, b"  ") == DEAD
