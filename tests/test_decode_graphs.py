"""Decode steps through the CUDA-graph path (static buffers, padded batch buckets, plans loaded into
fixed tensors) give the same tokens as the eager path. On CPU the path runs without the capture
(capture=False) under the Triton interpreter; tests/test_kernels_gpu.py replays real graphs."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.cuda_graphs import batch_buckets
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from test_prefix_sharing import multi_level_prompts

GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.9, top_p=0.9, seed=3)


def _generate(model_dir, prompts, params, backend: str, graphs: bool, **overrides):
    config = dict(model_dir=str(model_dir), device="cpu", max_batch_tokens=64, kv_cache_tokens=2048,
                  max_num_seqs=7, attention_backend=backend, cuda_graphs=graphs)
    config.update(overrides)
    engine = LLMEngine(EngineConfig(**config))
    if graphs:
        engine.runner.decode_graphs = engine.runner.make_decode_graphs(capture=False)
    out = {r.key: r.token_ids for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
    graphs = engine.runner.decode_graphs
    assert engine.stats().graph_steps == (graphs.steps if graphs is not None else 0)
    return out, graphs


def test_buckets_cover_every_batch_size() -> None:
    assert batch_buckets(7) == (1, 2, 4, 7)
    assert batch_buckets(256)[-1] == 256 and all(b < 256 for b in batch_buckets(256)[:-1])
    assert batch_buckets(1) == (1,)


# the sliding-window model: the Triton kernels (prefill, eager and graph-path decode) mask by each
# layer's window as the PyTorch path does
@pytest.mark.parametrize(("params", "variant"),
                         [(GREEDY, "llama_gqa"), (SAMPLED, "llama_gqa"), (GREEDY, "mistral_window")],
                         ids=["greedy", "sampled", "greedy-window"])
def test_graph_path_matches_eager(tiny_model_dir, params, variant: str) -> None:
    prompts = multi_level_prompts()[::3]  # shared prefixes (groups), duplicates, unshared rows
    if variant == "mistral_window" or params is SAMPLED:
        # one 37-token system prompt, three few-shot blocks: fewer interpreted steps (the sampled run checks
        # the sampler's path through the graphs; the greedy one, all the prompt shapes)
        prompts = multi_level_prompts()[9:18:2]
    model = tiny_model_dir(variant)
    want, _ = _generate(model, prompts, params, "torch", graphs=False)
    got, graphs = _generate(model, prompts, params, "triton", graphs=True)
    assert got == want
    assert graphs.steps > 0
    assert len(graphs.graphs) >= 2  # several buckets, so rows were padded


def _eager_logits(runner, kv_cache, ids, positions, slots, tables, group_ids, prefix_lens):
    """The same decode step through the PyTorch reference backend, on its own copy of the cache."""
    import torch

    from engine.step_context import StepContext
    from kernels.attention_backend import TorchBackend

    cfg, backend, device = runner.model_cfg, TorchBackend(), runner.device  # the runner's device: CUDA in the GPU tests
    meta = backend.build_step_metadata(
        [1] * len(ids), [p + 1 for p in positions], tables, runner.block_size, device,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, group_ids=group_ids, prefix_lens=prefix_lens,
    )
    caches = tuple((kv_cache[i, 0], kv_cache[i, 1]) for i in range(cfg.num_layers))
    ctx = StepContext(backend, caches, torch.tensor(slots, device=device), meta)
    hidden = runner.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), ctx)
    return runner.model.compute_logits(hidden).float()


def test_padding_rows_write_nothing_and_steps_reuse_buffers(tiny_model_dir) -> None:
    import torch

    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", kv_cache_tokens=256,
                                    max_num_seqs=7, attention_backend="triton"))
    runner = engine.runner
    bs = runner.block_size
    torch.manual_seed(0)
    runner.kv_cache.copy_(torch.randn_like(runner.kv_cache))
    runner.kv_cache[:, :, 0] = float("nan")  # no real row uses block 0: a padding row writing there shows
    graphs = runner.make_decode_graphs(capture=False)
    steps = [
        # 3 rows in bucket 4: two share a 2-block prefix, one has no group
        ([1, 2, 3], [[1, 2, 3], [1, 2, 4], [5, 6]], [(1, 2), (1, 2), None], [2 * bs, 2 * bs, 0], [39, 36, 20]),
        # the same bucket again with another plan (no group, longer context): loaded, not rebuilt
        ([7, 8, 9, 10], [[7, 8, 9, 10], [11], [12, 13], [14]], [None] * 4, [0] * 4, [60, 3, 17, 9]),
        # 2 rows: bucket 2
        ([4, 5], [[1, 2, 15], [1, 2, 3]], [(1, 2), (1, 2)], [2 * bs] * 2, [33, 40]),
    ]
    for ids, tables, gids, plens, positions in steps:
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
        reference_cache = runner.kv_cache.clone()
        want = _eager_logits(runner, reference_cache, ids, positions, slots, tables, gids, plens)
        got = graphs.run(ids, positions, slots, tables, gids, plens)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(runner.kv_cache, reference_cache, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert torch.isnan(runner.kv_cache[:, :, 0]).all(), "a padding row wrote into the cache"
    assert sorted(graphs.graphs) == [2, 4]
