"""One engine kept warm for bench/vs_vllm.py: batchllm's or vLLM's, in whichever venv has it.

    python bench/vs_vllm_worker.py SPEC_JSON RESULT_FD

SPEC_JSON: {"engine": "batchllm"|"vllm", "model_dir", "kv_tokens", "kv_bytes", "block_size",
"max_batch_tokens" (null: the engine's default), "mode" (batchllm: plan|lru|none),
"prefix_caching" (vLLM), "threads" (vLLM: cores its OpenMP threads bind to), "warmup_file"}.
Then one JSON request per stdin line: {"prompts_file": path of a JSON list of token-id lists,
"max_tokens": n, "outputs_file": where to write the generated ids}, or {"quit": true}. Every
answer (the ready message first) is one JSON line on RESULT_FD, so neither engine's logging on
stdout can garble it. Each request is greedy with EOS ignored, so every row yields exactly
max_tokens tokens, and starts cold: batchllm builds a fresh engine for it (outside the timed part;
its `lru` cache would otherwise keep the previous round's blocks), vLLM resets its prefix cache.

Imports only the standard library and the one engine it runs: batchllm's worker never needs vLLM
and vLLM's never needs batchllm (this file is run by path, with no package around it).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Callable

Generate = Callable[[list[list[int]], int], tuple[list[list[int]], dict[str, Any]]]


def batchllm_engine(spec: dict[str, Any]) -> tuple[Generate, dict[str, Any]]:
    import torch

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    chosen = {"max_batch_tokens": spec["max_batch_tokens"], "block_size": spec["block_size"]}
    config = EngineConfig(model_dir=spec["model_dir"], device="cpu", dtype=spec.get("dtype", "float32"),
                          prefix_sharing=spec["mode"], kv_cache_memory=spec["kv_bytes"],
                          kv_cache_tokens=spec["kv_tokens"], **{k: v for k, v in chosen.items() if v is not None})

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], dict[str, Any]]:
        engine = LLMEngine(config)  # fresh: nothing cached from an earlier round
        # resident before the timed part, as vLLM's is (it allocates its KV cache zero-filled at startup):
        # batchllm's comes untouched and would fault its pages in during the run (see vs_vllm.py, Method)
        engine.runner.kv_cache.zero_()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        done = {r.key: r for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        errors = [r.error for r in done.values() if r.error]
        if errors:
            raise RuntimeError(f"batchllm returned errors: {errors[:3]}")
        stats = engine.stats()
        info = {"engine_s": seconds, "prompt_tokens": stats.prompt_tokens, "prefill_tokens": stats.prefill_tokens,
                "cache_hit_tokens": stats.prefix_hit_tokens, "preemptions": stats.preemptions,
                "kv_capacity_tokens": engine.block_manager.num_blocks * engine.block_manager.block_size,
                # what the run met on the machine: page faults, preemptions of its threads, the thread count
                # the engine ended with (fewer than the CPUs: its governor saw other processes busy)
                "minor_faults": after.ru_minflt - usage.ru_minflt, "major_faults": after.ru_majflt - usage.ru_majflt,
                "involuntary_switches": after.ru_nivcsw - usage.ru_nivcsw,
                "threads_at_end": torch.get_num_threads()}
        return [list(done[i].token_ids) for i in range(len(prompts))], info

    setup = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
             "max_batch_tokens": config.max_batch_tokens, "max_num_seqs": config.max_num_seqs,
             "block_size": config.block_size}
    return generate, setup


def vllm_engine(spec: dict[str, Any]) -> tuple[Generate, dict[str, Any]]:
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the KV size comes from kv_cache_memory_bytes
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec["threads"]
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    chosen = {"max_num_batched_tokens": spec["max_batch_tokens"], "block_size": spec["block_size"]}
    llm = LLM(spec["model_dir"], dtype=spec.get("dtype", "float32"), kv_cache_memory_bytes=spec["kv_bytes"],
              enable_prefix_caching=spec["prefix_caching"], seed=0,
              **{k: v for k, v in chosen.items() if v is not None})

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], dict[str, Any]]:
        llm.reset_prefix_cache()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        start = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        prompt_tokens = sum(map(len, prompts))
        hits = sum(o.num_cached_tokens or 0 for o in outs)
        info = {"engine_s": seconds, "prompt_tokens": prompt_tokens, "prefill_tokens": prompt_tokens - hits,
                "cache_hit_tokens": hits, "preemptions": None}
        return [list(o.outputs[0].token_ids) for o in outs], info

    config = llm.llm_engine.vllm_config
    setup = {"vllm": vllm.__version__, "threads_bind": spec["threads"],
             "max_batch_tokens": config.scheduler_config.max_num_batched_tokens,
             "max_num_seqs": config.scheduler_config.max_num_seqs, "block_size": config.cache_config.block_size,
             "kv_blocks": config.cache_config.num_gpu_blocks}
    return generate, setup


def serve(spec: dict[str, Any], answer: Callable[[dict[str, Any]], None]) -> None:
    start = time.perf_counter()
    generate, setup = (batchllm_engine if spec["engine"] == "batchllm" else vllm_engine)(spec)
    with open(spec["warmup_file"]) as f:
        generate(json.load(f), 4)  # first forward passes: allocations, vLLM's compiled graphs
    answer({"ready": True, "startup_s": time.perf_counter() - start, **setup})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            return
        with open(request["prompts_file"]) as f:
            prompts = json.load(f)
        outputs, info = generate(prompts, request["max_tokens"])
        with open(request["outputs_file"], "w") as f:
            json.dump(outputs, f)
        answer({**info, "output_tokens": sum(map(len, outputs)), "rows": len(outputs)})


def main() -> int:
    # Run by path, bench/ is sys.path[0]: its kernels.py would shadow batchllm's kernels package.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    channel = os.fdopen(int(sys.argv[2]), "w")

    def answer(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        serve(spec, answer)
    except Exception as exc:  # the orchestrator reports it; the traceback is in this worker's log
        import traceback

        traceback.print_exc()
        answer({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process: nothing may run at import
    sys.exit(main())
