"""Decode-only steps replayed from captured CUDA graphs.

A decode step of a small model is hundreds of short kernel launches; on a GPU the launches, not the
math, set its time. A CUDA graph replays the whole forward (embeddings to logits) with one launch.
Graphs need fixed shapes and addresses, so a step of n decode rows runs in the smallest batch
bucket >= n: input ids, positions and cache slots live in static buffers (padding rows store
nothing: slot -1), and the step's shared-prefix decode plan is copied into a `StaticDecodePlan`.
A bucket's graph is captured the first time a step needs it, and captured again with larger
buffers when a plan outgrows them (more tiles as contexts grow); all graphs share one memory pool.

capture=False runs the same static-buffer forward eagerly instead of replaying a graph: the CPU
tests use it to check padding and plan loading, which are all a graph adds besides the capture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from engine.model_config import ModelConfig
from engine.step_context import StepContext
from kernels.attention_backend import AttentionBackend, StepAttentionMetadata
from kernels.host_tensors import copy_into
from kernels.static_decode_plan import DecodePlanCapacity, StaticDecodePlan

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: a few, so padding wastes at most a third."""
    return tuple(b for b in _BUCKETS if b < max_rows) + (max_rows,)


@dataclass
class _DecodeGraph:
    batch: int
    static: StaticDecodePlan
    forward: Callable[[], torch.Tensor]  # the eager body: logits [batch, vocab] float32
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the captured graph's output buffer

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        assert self.logits is not None
        return self.logits


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_caches: tuple[tuple[torch.Tensor, torch.Tensor], ...],
        model_cfg: ModelConfig,
        *,
        max_rows: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        capture: bool,
    ) -> None:
        graph_backend = backend.graph_variant()
        assert graph_backend is not None, "this attention backend cannot be captured"
        self.backend = graph_backend
        self.model = model
        self.kv_caches = kv_caches
        self.model_cfg = model_cfg
        self.block_size = block_size
        self.device = device
        self.capture = capture
        self.buckets = batch_buckets(max_rows)
        self.table_width = -(-max_model_len // block_size)
        # rows: input ids, positions, cache slots; one buffer so a step fills them with one copy
        self.step_inputs = torch.zeros(3, max_rows, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.step_inputs
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[int, _DecodeGraph] = {}
        self.captures = 0  # graphs captured so far (re-captures included)
        self.steps = 0  # decode steps run through this path

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def run(
        self,
        input_ids: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        group_ids: Sequence[Hashable | None],
        prefix_lens: Sequence[int],
    ) -> torch.Tensor:
        """Logits [n, vocab] float32 of a step of n decode rows (one token each), n <= max_rows."""
        n = len(input_ids)
        assert 0 < n <= self.max_rows
        self.steps += 1
        batch = next(b for b in self.buckets if b >= n)
        meta = self.backend.build_step_metadata(
            [1] * n, [p + 1 for p in positions], block_tables, self.block_size, self.device,
            num_heads=self.model_cfg.num_heads, num_kv_heads=self.model_cfg.num_kv_heads,
            group_ids=group_ids, prefix_lens=prefix_lens, window=self.model_cfg.attention_reach,
        )
        assert meta.paged is None and meta.shared is not None
        pad = batch - n
        copy_into(self.step_inputs[:, :batch],
                  [list(input_ids) + [0] * pad, list(positions) + [0] * pad, list(slots) + [-1] * pad])
        graph = self.graphs.get(batch)
        if graph is None or not graph.static.capacity.holds(meta.shared):
            graph = self._build(batch, meta.shared, graph)
            self.graphs[batch] = graph
            if graph.graph is not None:
                return graph.logits[:n]  # type: ignore[index]  # the warm-up computed this step
        else:
            graph.static.load(meta.shared)
        return graph.replay()[:n]

    def _build(self, batch: int, plan, previous: _DecodeGraph | None) -> _DecodeGraph:
        if previous is not None:
            cap = previous.static.capacity.grown_for(plan)
        else:
            cap = DecodePlanCapacity.fitting(plan, rows=batch, table_width=self.table_width)
        static = StaticDecodePlan.allocate(cap, self.device)
        static.load(plan)
        meta = StepAttentionMetadata(paged=None, shared=static.plan, num_tokens=batch, zero_uncovered=True)
        ids, pos, slots = self.input_ids[:batch], self.positions[:batch], self.slot_mapping[:batch]

        def forward() -> torch.Tensor:
            ctx = StepContext(self.backend, self.kv_caches, slots, meta)
            return self.model.compute_logits(self.model(ids, pos, ctx)).float()

        graph = _DecodeGraph(batch, static, forward)
        if not self.capture:
            return graph
        # Warm up on a side stream (kernel compilation, cuBLAS workspaces), as torch.cuda.graph
        # requires; the warm-up is this step's real forward, so its logits are this step's answer
        # and the cache slots it writes get the same values again at every later replay.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            warm = forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph.graph, pool=self.pool):
            graph.logits = forward()
        # the capture recorded but did not run the forward: hand back the warm-up's logits
        graph.logits.copy_(warm)
        self.captures += 1
        return graph
