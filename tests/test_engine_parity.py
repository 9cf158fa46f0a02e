"""Engine outputs equal Hugging Face transformers' token for token (float32, greedy), and the engine's
decoding rules (EOS, stop strings, stop ids, seeded sampling) behave as documented.

The "tight" setting (64-token steps, 288-token KV cache) makes prompts longer than one step prefill
in several chunks and makes decode growth preempt sequences, so parity there also covers chunked
prefill and recompute-after-preemption. The "roomy" setting separates model bugs from scheduling
bugs when only one of the two fails.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Hashable, Sequence

import pytest

import model_factory
from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.llm_engine import LLMEngine
from engine.results import GenerationResult
from engine.sampling_params import SamplingParams
from model_factory import Reference

MAX_TOKENS = 16
# decode_reservation 0 admits optimistically, so decode growth must preempt in the tight cache
TIGHT = {"max_batch_tokens": 64, "kv_cache_tokens": 288, "decode_reservation": 0.0}
ROOMY = {"max_batch_tokens": 1024, "kv_cache_tokens": 8192}
# Lengths around the 16-token block and 64-token step edges, plus prompts of several chunks.
PROMPT_LENGTHS = [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 66, 80, 100, 127, 128, 129,
                  150, 190, 200, 250, 5, 9, 12, 24, 40, 56, 72, 90]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    prompts = model_factory.make_prompts(PROMPT_LENGTHS, seed=7)
    # A shared 90-token prefix with distinct tails and one exact duplicate: the shapes a prefix
    # cache or shared-prefix kernel must get right.
    base = prompts[16][:90]
    tails = model_factory.make_prompts([5, 20, 40], seed=8)
    prompts += [base + t[1:] for t in tails] + [list(prompts[22])]
    return prompts


PROMPTS = _prompts()


@pytest.fixture(scope="session")
def reference(hf_model: Callable[[str], object]) -> Callable[[str], list[Reference]]:
    """HF greedy continuations of PROMPTS per variant, computed once per session."""
    cache: dict[str, list[Reference]] = {}

    def get(name: str) -> list[Reference]:
        if name not in cache:
            cache[name] = model_factory.hf_greedy(hf_model(name), PROMPTS, MAX_TOKENS)
        return cache[name]

    return get


def make_engine(model_dir: Path, **overrides: object) -> LLMEngine:
    settings = {"device": "cpu", "dtype": "float32", "block_size": 16, **ROOMY, **overrides}
    return LLMEngine(EngineConfig(model_dir=str(model_dir), **settings))  # type: ignore[arg-type]


def run(engine: LLMEngine, requests: Sequence[tuple[Hashable, Sequence[int], SamplingParams]]
        ) -> dict[Hashable, GenerationResult]:
    results = {r.key: r for r in engine.generate(iter(requests))}
    assert set(results) == {key for key, _, _ in requests}
    errors = {k: r.error for k, r in results.items() if r.error}
    assert not errors, errors
    return results


def divergences(results: dict[Hashable, GenerationResult], refs: list[Reference], variant: str) -> list[str]:
    """One line per prompt whose tokens differ: where, what was expected, and how close HF's top-2
    logits were there (a margin near 1e-5 would mean a float tie, not an engine bug)."""
    lines = []
    for i, result in sorted(results.items()):
        ref, got = refs[i], list(result.token_ids)
        if got == ref.tokens:
            continue
        pos = next((j for j, (a, b) in enumerate(zip(got, ref.tokens)) if a != b), min(len(got), len(ref.tokens)))
        margin = f"{ref.margins[pos]:.2e}" if pos < len(ref.margins) else "n/a"
        lines.append(
            f"[{variant}] prompt {i} (len {len(PROMPTS[i])}): first divergence at generated position {pos}: "
            f"expected {ref.tokens[pos:pos + 4]} got {got[pos:pos + 4]} (HF top-2 margin {margin}); "
            f"expected {ref.tokens} got {got}"
        )
    return lines


# ---------------------------------------------------------------- greedy parity

@pytest.mark.parametrize("variant", list(model_factory.VARIANTS))
def test_reference_has_no_near_ties(variant: str, reference) -> None:
    """Guards the fixtures, not the engine: engine and HF differ by ~1e-6 in float32, so a smaller
    top-2 margin would make parity a coin flip. If this fails, change the variant's seed."""
    worst = min(min(r.margins) for r in reference(variant))
    assert worst > 1e-4, f"{variant}: HF greedy top-2 logit margin {worst:.1e} is a near tie"


# Every variant in plan mode; the other sharing modes once per family beyond Llama's (and on the
# sliding-window models), where the tight cache (chunked prefill, preemption) exercises them hardest.
NEW_FAMILIES = ("phi3", "granite", "olmo2", "mistral_window", "phi3_window", "qwen3_moe", "mixtral_window", "gemma2",
                "gemma3", "gemma3_v4")
PARITY_CASES = (
    [(v, "plan", s) for v in model_factory.VARIANTS for s in ("roomy", "tight")]
    + [("llama_gqa", m, s) for m in ("lru", "none") for s in ("roomy", "tight")]
    + [(v, m, "tight") for v in NEW_FAMILIES for m in ("lru", "none")]
)


@pytest.mark.parametrize(("variant", "sharing", "setting"), PARITY_CASES)
def test_greedy_parity(variant: str, sharing: str, setting: str, tiny_model_dir, reference) -> None:
    refs = reference(variant)
    config = dict(TIGHT if setting == "tight" else ROOMY, prefix_sharing=sharing)
    max_model_len = model_factory.VARIANTS[variant].max_model_len
    if max_model_len is not None:
        config["max_model_len"] = max_model_len
    engine = make_engine(tiny_model_dir(variant), **config)
    results = run(engine, [(i, p, GREEDY) for i, p in enumerate(PROMPTS)])
    bad = divergences(results, refs, f"{variant}/{sharing}/{setting}")
    assert not bad, f"{len(bad)}/{len(PROMPTS)} prompts differ from transformers:\n" + "\n".join(bad)
    for i, prompt in enumerate(PROMPTS):
        r = results[i]
        assert r.finish_reason == "length" and r.prompt_tokens == len(prompt), (i, r)
    stats = engine.stats()
    assert stats.requests_finished == len(PROMPTS)
    assert stats.completion_tokens == len(PROMPTS) * MAX_TOKENS
    if sharing == "none":
        assert stats.prefill_tokens >= sum(map(len, PROMPTS))
    else:
        # the prompts share a 90-token prefix and contain a duplicate: sharing must save work
        assert stats.prefix_hit_tokens > 0 and stats.prefill_tokens < sum(map(len, PROMPTS)), stats
    if sharing == "plan" and setting == "roomy":
        assert stats.prefill_tokens <= 1.02 * stats.unique_prompt_tokens, stats
    if setting == "tight":
        # the cache cannot hold every sequence's growth, so some must have been recomputed
        assert stats.preemptions > 0, stats


def test_sliding_window_decides_the_output(tiny_model_dir, reference, tmp_path: Path) -> None:
    """Guards the Mistral parity cases: the same weights without the window must answer differently,
    so their parity really checks the window (and the config key that sets it)."""
    model_dir = _copy_dir(tiny_model_dir("mistral_window"), tmp_path / "no-window")
    _edit_json(model_dir / "config.json", sliding_window=None)
    results = run(make_engine(model_dir), [(i, p, GREEDY) for i, p in enumerate(PROMPTS)])
    differ = divergences(results, reference("mistral_window"), "mistral_window without its window")
    window = model_factory.VARIANTS["mistral_window"].config["sliding_window"]
    longer = sum(len(p) + MAX_TOKENS > window for p in PROMPTS)
    assert len(differ) >= longer // 2, f"only {len(differ)} of {longer} prompts longer than the window differ"


def test_long_prompt_prefills_in_chunks(tiny_model_dir, reference) -> None:
    variant, idx = "llama_gqa", PROMPT_LENGTHS.index(250)
    engine = make_engine(tiny_model_dir(variant), **TIGHT)
    results = run(engine, [(idx, PROMPTS[idx], GREEDY)])
    assert list(results[idx].token_ids) == reference(variant)[idx].tokens
    stats = engine.stats()
    # Unchunked, this would be 1 prefill step + (MAX_TOKENS - 1) decode steps.
    min_steps = math.ceil(len(PROMPTS[idx]) / TIGHT["max_batch_tokens"]) + MAX_TOKENS - 1
    assert stats.steps >= min_steps, stats
    assert stats.prefill_tokens == len(PROMPTS[idx]) and stats.preemptions == 0, stats


def test_demo_model_parity(demo_model_dir: Path) -> None:
    """The built-in demo model goes through the same loader: check it against transformers too."""
    from engine.demo_model import BOS_ID

    prompts = [[BOS_ID, *s.encode()] for s in
               ("Classify: great product!", "hello", "Summarize the following text: " + "lorem ipsum " * 12)]
    refs = model_factory.hf_greedy(model_factory.load_hf_model(demo_model_dir), prompts, 8)
    engine = make_engine(demo_model_dir)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    results = run(engine, [(i, p, params) for i, p in enumerate(prompts)])
    for i, ref in enumerate(refs):
        assert list(results[i].token_ids) == ref.tokens, (i, ref.tokens, results[i].token_ids)


# ---------------------------------------------------------------- loading

def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_unknown_architecture_names_supported_ones(tiny_model_dir, tmp_path: Path) -> None:
    model_dir = _copy_dir(tiny_model_dir("llama_mha"), tmp_path / "gpt2")
    _edit_json(model_dir / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelLoadError) as info:
        make_engine(model_dir)
    message = str(info.value)
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Phi3ForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM",
                 "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        assert name in message, message


def test_mistral_config_keys(tiny_model_dir, tmp_path: Path) -> None:
    """The window comes from `sliding_window` (null: none); a config without `architectures` is
    recognised by its model_type."""
    from engine.model_config import load_model_config

    assert load_model_config(tiny_model_dir("mistral_window")).sliding_window == 13
    assert load_model_config(tiny_model_dir("mistral_full")).sliding_window is None
    model_dir = _copy_dir(tiny_model_dir("mistral_window"), tmp_path / "no-architectures")
    _edit_json(model_dir / "config.json", architectures=None)
    cfg = load_model_config(model_dir)
    assert (cfg.architecture, cfg.sliding_window, cfg.attention_reach) == ("MistralForCausalLM", 13, 13)


def test_eos_ids_come_from_all_sources(tiny_model_dir, tmp_path: Path) -> None:
    from engine.tokenizer import Tokenizer

    sid = model_factory.special_id
    model_dir = _copy_dir(tiny_model_dir("llama_gqa"), tmp_path / "eos")
    _edit_json(model_dir / "config.json", eos_token_id=sid("<|user|>"))
    _edit_json(model_dir / "generation_config.json", eos_token_id=[sid(model_factory.EOT)])
    _edit_json(model_dir / "tokenizer_config.json", eos_token="<|system|>")
    expected = {sid("<|user|>"), sid(model_factory.EOT), sid("<|system|>")}
    assert set(Tokenizer(model_dir).eos_token_ids) == expected
    assert set(make_engine(model_dir).eos_token_ids) == expected


# ---------------------------------------------------------------- stopping rules

def _pick_prompt(refs: list[Reference], ok: Callable[[Reference], bool]) -> int:
    return next(i for i, r in enumerate(refs) if ok(r))


def test_eos_stops_unless_ignored(tiny_model_dir, reference, tmp_path: Path) -> None:
    variant = "llama_gqa"
    refs = reference(variant)
    # Declare a token greedy decoding emits mid-way as EOS (it is ordinary text to the model).
    i = _pick_prompt(refs, lambda r: r.tokens[4] not in r.tokens[:4])
    eos = refs[i].tokens[4]
    model_dir = _copy_dir(tiny_model_dir(variant), tmp_path / "eos")
    _edit_json(model_dir / "generation_config.json", eos_token_id=[eos])
    engine = make_engine(model_dir)
    params = SamplingParams(max_tokens=MAX_TOKENS)
    declared = set(engine.eos_token_ids)
    stop_at = next(j for j, t in enumerate(refs[i].tokens) if t in declared)
    r = run(engine, [("a", PROMPTS[i], params)])["a"]
    assert r.finish_reason == "stop"
    assert list(r.token_ids) == refs[i].tokens[: stop_at + 1]  # the EOS id is reported...
    assert r.text == engine.tokenizer.decode(refs[i].tokens[:stop_at])  # ...but not shown as text
    ignored = run(engine, [("b", PROMPTS[i], GREEDY)])["b"]
    assert list(ignored.token_ids) == refs[i].tokens and ignored.finish_reason == "length"


def test_stop_token_ids(tiny_model_dir, reference) -> None:
    variant = "qwen2"
    refs = reference(variant)
    i = _pick_prompt(refs, lambda r: r.tokens[3] not in r.tokens[:3])
    stop_id = refs[i].tokens[3]
    engine = make_engine(tiny_model_dir(variant))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop_token_ids=(stop_id,))
    r = run(engine, [("k", PROMPTS[i], params)])["k"]
    assert r.finish_reason == "stop"
    assert list(r.token_ids) == refs[i].tokens[:4]
    assert r.text == engine.tokenizer.decode(refs[i].tokens[:3])


def test_stop_strings_cut_text(tiny_model_dir, reference) -> None:
    variant = "llama_mha"
    refs = reference(variant)
    engine = make_engine(tiny_model_dir(variant))
    full = [engine.tokenizer.decode(r.tokens) for r in refs]
    i = next(j for j, t in enumerate(full) if len(t.strip()) >= 12)
    text = full[i]
    stop = text[8:11]
    cut = text.find(stop)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=("#never#", stop))
    r = run(engine, [("s", PROMPTS[i], params)])["s"]
    assert r.finish_reason == "stop"
    assert r.text == text[:cut], (text, stop, r.text)
    assert stop not in r.text
    # the engine stopped at the token that completed the stop string, not later
    assert list(r.token_ids) == refs[i].tokens[: len(r.token_ids)]
    assert len(r.token_ids) < MAX_TOKENS or stop in engine.tokenizer.decode(refs[i].tokens)


# ---------------------------------------------------------------- sampling

SAMPLED = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=1234, ignore_eos=True)


def test_sampling_reproducible_and_batch_independent(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama_gqa")
    target = ("row-7", PROMPTS[20], SAMPLED)
    alone = run(make_engine(model_dir), [target])["row-7"].token_ids
    again = run(make_engine(model_dir), [target])["row-7"].token_ids
    assert alone == again
    others = [(f"other-{j}", PROMPTS[j], SAMPLED) for j in range(20)]
    batched = run(make_engine(model_dir, **TIGHT), others[:10] + [target] + others[10:])
    assert batched["row-7"].token_ids == alone
    # a different seed or key draws differently (12 tokens from ~420: equal by chance is negligible)
    reseeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=99, ignore_eos=True)
    other = run(make_engine(model_dir), [("row-7", PROMPTS[20], reseeded), ("row-8", PROMPTS[20], SAMPLED)])
    assert other["row-7"].token_ids != alone and other["row-8"].token_ids != alone


def test_sampling_differs_from_greedy(tiny_model_dir, reference) -> None:
    refs = reference("llama_gqa")
    results = run(make_engine(tiny_model_dir("llama_gqa")), [(i, PROMPTS[i], SAMPLED) for i in range(8)])
    assert any(list(results[i].token_ids) != refs[i].tokens for i in range(8))


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_k=1, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, top_p=1e-6, seed=5, ignore_eos=True),
], ids=["top_k=1", "tiny_top_p"])
def test_degenerate_filters_equal_greedy(params: SamplingParams, tiny_model_dir, reference) -> None:
    variant = "qwen3"
    refs = reference(variant)
    results = run(make_engine(tiny_model_dir(variant)), [(i, PROMPTS[i], params) for i in range(0, 36, 3)])
    bad = divergences(results, refs, variant)
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- context edges and bad rows

def test_parity_up_to_the_context_end(tiny_model_dir, hf_model) -> None:
    """A prompt ending 12 tokens before max_position_embeddings: the engine clamps max_tokens to the
    context and every position up to the last (llama3-scaled RoPE included) matches transformers."""
    variant = "llama3_rope_v4"
    room = 12
    prompt = model_factory.make_prompts([model_factory.MAX_POSITIONS - room], seed=11)[0]
    ref = model_factory.hf_greedy(hf_model(variant), [prompt], room)[0]
    engine = make_engine(tiny_model_dir(variant), **{**TIGHT, "kv_cache_tokens": model_factory.MAX_POSITIONS})
    r = run(engine, [("edge", prompt, SamplingParams(max_tokens=64, ignore_eos=True))])["edge"]
    assert list(r.token_ids) == ref.tokens, (ref.tokens, r.token_ids)
    assert r.finish_reason == "length"


def test_bad_rows_become_errors_not_exceptions(tiny_model_dir, reference) -> None:
    variant = "llama_gqa"
    refs = reference(variant)
    engine = make_engine(tiny_model_dir(variant))
    too_long = model_factory.make_prompts([model_factory.MAX_POSITIONS + 5], seed=12)[0]
    requests = [("empty", [], GREEDY), ("long", too_long, GREEDY), ("ok", PROMPTS[3], GREEDY)]
    results = {r.key: r for r in engine.generate(iter(requests))}
    for key in ("empty", "long"):
        assert results[key].finish_reason == "error" and results[key].error, results[key]
        assert results[key].token_ids == ()
    assert results["ok"].error is None and list(results["ok"].token_ids) == refs[3].tokens
