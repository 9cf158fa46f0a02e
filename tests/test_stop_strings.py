"""Stop strings are found incrementally with exactly the result of decoding the whole completion at
every step (the engine's former rule), including characters split across byte tokens and stop
strings spanning token boundaries, and a step's decoding cost does not grow with the completion."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import model_factory
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.stop_strings import StopStringWatch
from engine.tokenizer import Tokenizer

# Non-ASCII text the test tokenizer (trained on ASCII) spells byte by byte: 2-, 3- and 4-byte characters.
MULTIBYTE = ["é", "ß", "中", "文", "🎉", "naïve", " 北京 ", "€5", "😀!"]
ASCII = [" the cat", " found", " a small boat", ".", "ab", " 7:30", "\n"]


class CountingTokenizer(Tokenizer):
    """The real tokenizer, recording how many token ids each decode call was given."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.decoded: list[int] = []

    def decode(self, token_ids: Sequence[int]) -> str:
        self.decoded.append(len(token_ids))
        return super().decode(token_ids)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CountingTokenizer:
    """The byte-level BPE tokenizer of the test models (as Llama 3's and Qwen's)."""
    out = tmp_path_factory.mktemp("tokenizer")
    model_factory.write_tokenizer(out, chat_template_file=True)
    return CountingTokenizer(out)


@pytest.fixture(scope="module")
def byte_fallback_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("byte-fallback-tokenizer")
    (out / "tokenizer.json").write_text(model_factory.byte_fallback_tokenizer_json(), encoding="utf-8")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return Tokenizer(out)


def full_decode_stop(tokenizer: Tokenizer, completion: Sequence[int], stops: Sequence[str]) -> int | None:
    """The rule the engine used before: decode the whole completion, take the earliest stop string."""
    text = tokenizer.decode(completion)
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


@st.composite
def stop_strings(draw: st.DrawFn, text: str) -> list[str]:
    """Stop strings cut from the final text (so they often match, across token boundaries and inside
    split characters, U+FFFD included) plus arbitrary ones."""
    cut = st.tuples(st.integers(0, len(text)), st.integers(1, 6)).map(lambda ab: text[ab[0] : ab[0] + ab[1]])
    return draw(st.lists(st.one_of(cut, st.sampled_from(MULTIBYTE + ASCII), st.text(max_size=3)),
                         min_size=1, max_size=3))


@st.composite
def token_streams(draw: st.DrawFn, tokenizer: Tokenizer) -> list[int]:
    """Pieces of real text (multi-byte characters become several byte tokens) mixed with arbitrary
    ids: special tokens (decoded as nothing), lone UTF-8 continuation and lead bytes."""
    piece = st.one_of(
        st.sampled_from(MULTIBYTE + ASCII).map(lambda t: tokenizer.encode(t, add_special_tokens=False)),
        st.lists(st.integers(0, tokenizer.vocab_size - 1), min_size=1, max_size=3),
    )
    return [t for p in draw(st.lists(piece, min_size=1, max_size=14)) for t in p]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_equals_full_decode_at_every_step(tokenizer: Tokenizer, data: st.DataObject) -> None:
    prompt = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=4), label="prompt")
    completion = data.draw(token_streams(tokenizer), label="completion")
    stops = data.draw(stop_strings(tokenizer.decode(completion)), label="stops")
    watch = StopStringWatch(stops, len(prompt))
    token_ids = list(prompt)
    for k, token in enumerate(completion, 1):
        token_ids.append(token)
        expected = full_decode_stop(tokenizer, completion[:k], stops)
        assert watch.find(tokenizer.decode, token_ids) == expected, (k, completion, stops)
        if expected is not None:
            break


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_byte_fallback_stops_at_the_same_token(byte_fallback_tokenizer: Tokenizer, data: st.DataObject) -> None:
    """A byte-fallback decoder turns a whole run of byte tokens into U+FFFDs once one byte makes it
    invalid, so earlier text can change; stop strings without U+FFFD still end the row at the token
    where the full decode first holds one (the engine cuts the answer on the full decode)."""
    tokenizer = byte_fallback_tokenizer
    completion = data.draw(token_streams(tokenizer), label="completion")
    stops = [s for s in data.draw(stop_strings(tokenizer.decode(completion)), label="stops") if "\ufffd" not in s]
    watch = StopStringWatch(stops, 0)
    for k in range(1, len(completion) + 1):
        expected = full_decode_stop(tokenizer, completion[:k], stops)
        found = watch.find(tokenizer.decode, completion[:k])
        assert (found is None) == (expected is None), (k, completion, stops)
        if expected is not None:
            break


def test_split_character_and_boundary_spanning_stop(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ab 中文 cd", add_special_tokens=False)
    assert any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids)))  # 中 spans tokens
    # "\ufffd" matches where the full decode showed the unfinished 中 as U+FFFD, as it always did
    for stop, index in (("中文", 3), ("文 c", 4), ("b 中", 1), ("\ufffd", 3)):
        watch = StopStringWatch(["#never#", stop], 0)
        found = [watch.find(tokenizer.decode, ids[:k]) for k in range(1, len(ids) + 1)]
        step = next(k for k, f in enumerate(found, 1) if f is not None)
        assert found[step - 1] == index, stop
        # found at the very token that completed it
        assert stop in tokenizer.decode(ids[:step]) and stop not in tokenizer.decode(ids[: step - 1]), stop


def _long_stream(tokenizer: Tokenizer) -> list[int]:
    text = " ".join(f"the cat {c} found a small boat 🎉" for c in "中文éß北京" * 40)
    # a run of lone continuation bytes never decodes to a whole character: the held tail must be cut
    lone = tokenizer.encode("é", add_special_tokens=False)[1]
    return tokenizer.encode(text, add_special_tokens=False) + [lone] * 300 + tokenizer.encode(" end")


def test_decoding_per_token_does_not_grow_with_length(tokenizer: CountingTokenizer) -> None:
    ids = _long_stream(tokenizer)
    assert len(ids) > 5000
    watch = StopStringWatch(["#never#"], 0)
    per_step: list[int] = []
    for k in range(1, len(ids) + 1):
        tokenizer.decoded.clear()
        assert watch.find(tokenizer.decode, ids[:k]) is None
        per_step.append(sum(tokenizer.decoded))
    # the whole-completion decode would reach len(ids) tokens per step and ~len(ids)**2 / 2 in all;
    # here a step decodes its context, its window and, in the run of lone bytes, a cut: a few dozen
    assert max(per_step) <= 32, max(per_step)
    assert sum(per_step) <= 5 * len(ids), sum(per_step)


def test_engine_decodes_a_bounded_window_per_token(tiny_model_dir, tmp_path: Path) -> None:
    """Through the engine: a long completion with a stop string that never matches decodes a bounded
    number of tokens per generated token, and the answer is the whole decoded completion."""
    model_dir = tiny_model_dir("llama_gqa")
    tokenizer = CountingTokenizer(model_dir)
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), kv_cache_tokens=2048), tokenizer=tokenizer)
    params = SamplingParams(max_tokens=300, ignore_eos=True, stop=("#never#",))
    prompt = model_factory.make_prompts([12], seed=3)[0]
    (result,) = list(engine.generate([("k", prompt, params)]))
    assert result.finish_reason == "length" and len(result.token_ids) == 300
    decoded_during_generation = sum(tokenizer.decoded) - len(result.token_ids)  # less the answer's decode
    assert decoded_during_generation <= 32 * 300, decoded_during_generation
    assert result.text == Tokenizer(model_dir).decode(result.token_ids)


def test_a_space_after_a_token_that_shows_no_text_is_not_lost(byte_fallback_tokenizer: Tokenizer) -> None:
    """'!', <unk> (no text), then a piece whose text is its leading space: decoded after <unk> alone the
    space looks like the start of the text and is dropped, which hid the stop string '! '."""
    tokenizer = byte_fallback_tokenizer
    unk = tokenizer.encode("<unk>", add_special_tokens=False)
    completion = [3, *unk, 41]
    assert tokenizer.decode(completion) == "! " and tokenizer.decode(unk) == "" and tokenizer.decode([41]) == ""
    watch = StopStringWatch(["! "], 0)
    found = [watch.find(tokenizer.decode, completion[:k]) for k in range(1, len(completion) + 1)]
    assert found == [None, None, 0]
