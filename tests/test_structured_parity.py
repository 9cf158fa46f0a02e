"""Constrained greedy decoding equals transformers `generate` with xgrammar's own logits processor, token
for token (float32), on tiny random-weight Llama/Qwen2/Qwen3 models, with plan/lru/none prefix sharing and
with preemption (recompute) in a tight KV cache."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

import model_factory
from engine.grammar import StructuredOutput, compile_constraint
from engine.sampling_params import SamplingParams
from test_engine_parity import PROMPTS, ROOMY, TIGHT, make_engine, run

MAX_TOKENS = 48  # most answers end by then, some are cut: both endings are compared
# short keys: the tiny test tokenizer spends about a token per character of JSON
SCHEMA = StructuredOutput("json_schema", json.dumps({
    "type": "object",
    "properties": {
        "l": {"enum": ["pos", "neg", "mixed"]},  # enum
        "s": {"type": "integer", "minimum": 1, "maximum": 5},  # integer bounds
        "w": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}},  # nested
        "c": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},  # array
        "o": {"type": "string", "maxLength": 2},  # optional
    },
    "required": ["l", "s", "c"],
}))
CHOICES = StructuredOutput.choices(["positive", "negative", "neutral", "n/a"])
REGEX = StructuredOutput("regex", r"[A-Z]{2}-[0-9]{1,3}( [a-z]+)?")


@pytest.fixture(scope="module")
def hf_constrained(tiny_model_dir, hf_model) -> Callable[[str, StructuredOutput], list[list[int]]]:
    """HF greedy output per prompt under xgrammar's transformers logits processor, stopping at EOS."""
    import xgrammar as xgr

    from engine.model_config import load_model_config
    from engine.tokenizer import Tokenizer

    cache: dict[tuple[str, StructuredOutput], list[list[int]]] = {}

    @torch.no_grad()
    def get(variant: str, spec: StructuredOutput) -> list[list[int]]:
        if (variant, spec) not in cache:
            model_dir = tiny_model_dir(variant)
            eos = sorted(Tokenizer(model_dir).eos_token_ids)
            compiled = compile_constraint(spec, model_dir, load_model_config(model_dir).vocab_size, frozenset(eos))
            model = hf_model(variant)
            outs = []
            for prompt in PROMPTS:
                ids = torch.tensor([prompt], dtype=torch.long)
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                    logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)], eos_token_id=eos, pad_token_id=0,
                )
                outs.append(out[0, ids.shape[1]:].tolist())
            cache[(variant, spec)] = outs
        return cache[(variant, spec)]

    return get


CASES = [
    ("llama_gqa", "plan", "roomy", SCHEMA), ("qwen2", "plan", "roomy", SCHEMA), ("qwen3", "plan", "roomy", SCHEMA),
    ("llama_gqa", "lru", "roomy", SCHEMA), ("llama_gqa", "none", "roomy", SCHEMA),
    ("llama_gqa", "plan", "tight", SCHEMA),
    ("qwen3", "plan", "roomy", CHOICES), ("qwen2", "lru", "tight", REGEX),
]


@pytest.mark.parametrize(("variant", "sharing", "setting", "spec"), CASES,
                         ids=[f"{v}-{s}-{t}-{c.kind}" for v, s, t, c in CASES])
def test_constrained_greedy_parity(
    variant: str, sharing: str, setting: str, spec: StructuredOutput, tiny_model_dir: Callable[[str], Path],
    hf_constrained,
) -> None:
    expected = hf_constrained(variant, spec)
    # tight: the longest prompt plus MAX_TOKENS just fits, so decode growth preempts (and recomputes) rows
    tight = dict(TIGHT, kv_cache_tokens=320)
    config = dict(tight if setting == "tight" else ROOMY, prefix_sharing=sharing)
    engine = make_engine(tiny_model_dir(variant), **config)
    params = SamplingParams(max_tokens=MAX_TOKENS, structured=spec)
    results = run(engine, [(i, p, params) for i, p in enumerate(PROMPTS)])
    bad = [(i, expected[i], list(r.token_ids)) for i, r in sorted(results.items()) if list(r.token_ids) != expected[i]]
    assert not bad, f"{len(bad)}/{len(PROMPTS)} prompts differ from transformers + xgrammar: {bad[:3]}"
    stopped = [r for r in results.values() if r.finish_reason == "stop"]
    assert stopped, "no answer reached the end of its grammar; the test would not check EOS handling"
    for r in stopped:  # a whole answer is a whole value
        if spec.kind == "json_schema":
            json.loads(r.text)  # strict JSON: no raw control characters in strings
        elif spec.kind == "choices":
            assert r.text in spec.labels, r.text
    if setting == "tight":
        assert engine.stats().preemptions > 0  # matchers survived recompute


def test_constrained_answer_ends_with_its_grammar_even_with_ignore_eos(tiny_model_dir) -> None:
    engine = make_engine(tiny_model_dir("qwen3"))
    params = SamplingParams(max_tokens=MAX_TOKENS, structured=CHOICES, ignore_eos=True)
    results = run(engine, [(i, p, params) for i, p in enumerate(PROMPTS[:8])])
    assert all(r.finish_reason == "stop" and r.text in CHOICES.labels for r in results.values()), results


@pytest.mark.parametrize("vocab", [32000, 259])  # a vocabulary that is a multiple of 32 and one that is not
def test_host_mask_apply_matches_xgrammars_kernel(vocab: int) -> None:
    """The host's table-lookup apply forbids exactly the tokens xgrammar's own kernel forbids, for all
    sampling rows and for a subset of them (rows of unconstrained requests stay untouched)."""
    import xgrammar as xgr

    from engine.grammar_mask import TokenMask, apply_token_mask

    gen = torch.Generator().manual_seed(0)
    bitmask = xgr.allocate_token_bitmask(5, vocab)
    bitmask.copy_(torch.randint(-(2**31), 2**31 - 1, bitmask.shape, generator=gen, dtype=torch.int32))
    logits = torch.randn(5, vocab, generator=gen)
    for rows in ([0, 1, 2, 3, 4], [1, 3]):
        ours, theirs = logits.clone(), logits.clone()
        apply_token_mask(ours, TokenMask(bitmask, rows))
        xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=rows if len(rows) < 5 else None)
        assert torch.equal(ours, theirs)
