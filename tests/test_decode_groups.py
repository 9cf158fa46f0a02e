"""Decode rows whose shared prefixes nest (documents, under each questions, under each phrasings) attend
grouped by the depth that reads the least (engine/decode_groups.py), with the same answers."""
from __future__ import annotations

import random
from collections import Counter

import model_factory
from engine.config import EngineConfig
from engine.decode_groups import choose_levels
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def test_a_document_shared_by_many_rows_groups_them_over_the_question_shared_by_few() -> None:
    # 4 questions (52 blocks deep) x 4 phrasings each under one 50-block document: one group of 16
    tables = [[d for d in range(50)] + [100 + q, 200 + q, 300 + q] for q in range(4)]
    assert choose_levels([(52, 50)] * 4, tables, [4] * 4, 2) == [50] * 4
    # a 12-block system prompt over 48 documents of 75 blocks, 16 rows each: the documents stay the groups
    tables = [list(range(12)) + [1000 + 100 * d + b for b in range(63)] for d in range(48)]
    assert choose_levels([(75, 12)] * 48, tables, [16] * 48, 2) == [75] * 48
    # rows alone under their question, and rows without any shared prefix
    assert choose_levels([(52, 50), ()], [tables[0][:52], [7]], [1, 1], 2) == [52, 0]


def _doc_questions_phrasings(docs: int, questions: int, phrasings: int) -> list[list[int]]:
    rng = random.Random(11)
    vocab = model_factory.tokenizer_size() - 10

    def toks(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    prompts = []
    for _ in range(docs):
        doc = toks(70)
        for _ in range(questions):
            question = toks(20)
            prompts += [doc + question + toks(3) for _ in range(phrasings)]
    return prompts


def test_rows_of_one_document_decode_as_one_group_with_the_answers_of_no_sharing(tiny_model_dir) -> None:
    model = tiny_model_dir("llama_gqa")
    prompts = _doc_questions_phrasings(2, 3, 4)
    params = SamplingParams(max_tokens=5, ignore_eos=True)

    def run(sharing: str) -> tuple[dict, list[Counter]]:
        engine = LLMEngine(EngineConfig(model_dir=str(model), prefix_sharing=sharing, block_size=16,
                                        kv_cache_tokens=4096, dtype="float32"))
        backend, decode_groups = engine.runner.attention_backend, []
        build = backend.build_step_metadata

        def spy(query_lens, context_lens, tables, block_size, device, **kw):  # noqa: ANN001, ANN003
            if all(n == 1 for n in query_lens):
                decode_groups.append(Counter(zip(kw["group_ids"], kw["prefix_lens"])))
            return build(query_lens, context_lens, tables, block_size, device, **kw)

        backend.build_step_metadata = spy
        out = {r.key: r.token_ids for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
        return out, decode_groups

    plan, groups = run("plan")
    none, _ = run("none")
    assert plan == none
    # a decode step of plan mode groups each document's 12 rows by the document's 4 full blocks (64 tokens),
    # not by their question's 5 (4 rows each)
    full_step = groups[0]
    assert sorted(full_step.values()) == [12, 12], full_step
    assert {plen for _, plen in full_step} == {64}, full_step
