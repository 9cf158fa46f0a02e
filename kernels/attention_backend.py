"""Which implementation runs the attention ops: PyTorch references or Triton kernels.

Both backends have the same methods and the same meaning; only speed differs (and float rounding).
The engine builds the per-step metadata once with the backend's builders and every layer reuses it:

    backend = select_backend("auto", device)            # once, at engine start
    meta = backend.build_step_metadata(                 # once per step (host lists, no device sync)
        query_lens, context_lens, block_tables, block_size, device,
        num_heads=..., num_kv_heads=..., group_ids=..., prefix_lens=...)
    backend.store_kv(k, v, k_cache, v_cache, slot_mapping)   # per layer
    out = backend.attention(q, k_cache, v_cache, meta, scale, window=layer_window)  # per layer

Sliding windows: `window` of an attention call is that layer's (None: full causal attention); the
step metadata's `window` is the largest any layer uses (None: some layer has none), so that the
PyTorch paths never gather blocks before it (the Triton kernels skip them per call).

Soft-capping: `softcap` of an attention call (Gemma 2) caps each scaled score to
softcap * tanh(score / softcap) before the softmax; None: no capping. The PyTorch paths then run
their matmul forms (PyTorch's fused attention cannot cap); the Triton kernels cap in their tiles.

`build_step_metadata` routes every decode chunk (query_len 1) through `shared_prefix_decode`
(members of a group share one pass over the group's prefix; rows without a group are plain rows of
the same launch) and every other chunk through `paged_attention` (causal varlen over the cache),
except prefill chunks of a group's members after the group's prefix (see `group_prefill_max_rows`):
per query token through the shared launch (Triton), or as whole chunks through the backend's group
prefill (the PyTorch path, `group_prefill_chunks`: kernels.group_prefill_torch).
The lower-level builders and ops are public too, for callers that route rows themselves.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Hashable, Protocol, Sequence

import torch

from kernels import backend_device_problem, cpu_fused
from kernels.group_prefill_torch import TorchGroupPrefillPlan, group_prefill_torch, plan_group_prefill_torch
from kernels.paged_attention import build_paged_batch, store_kv_reference
from kernels.paged_attention_torch import GatherBuffers, TorchPagedPlan, paged_attention_torch, plan_paged_torch
from kernels.shared_prefix_attention import build_shared_prefix_batch
from kernels.shared_prefix_torch import TorchSharedPrefixPlan, plan_shared_prefix_torch, shared_prefix_decode_torch

__all__ = [
    "AttentionBackend",
    "StepAttentionMetadata",
    "TorchBackend",
    "TritonBackend",
    "select_backend",
]

BACKEND_NAMES = ("auto", "torch", "triton")
GRAPH_GROUP_BLOCK_M = 64  # group-tile rows in CUDA-graph decode steps (16 members x 4 query heads per KV head)


@dataclass(frozen=True)
class StepAttentionMetadata:
    """Everything one step's attention layers need: either part may be None (nothing routed there)."""

    paged: Any  # the backend's paged-attention metadata for the non-decode chunks
    shared: Any  # the backend's shared-prefix metadata for the decode chunks
    num_tokens: int  # rows of q
    # rows of q that no part covers (padding of a CUDA-graph batch) come out as zeros, not garbage
    zero_uncovered: bool = False
    # the backend's group-prefill metadata for whole prefill chunks of group members (backends with
    # `group_prefill_chunks`), None when none is routed there
    group_prefill: Any = None


class AttentionBackend(Protocol):
    name: str

    def store_kv(
        self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def build_paged_metadata(
        self, query_lens: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
        block_size: int, device: torch.device | str, *, num_heads: int, num_kv_heads: int,
        query_starts: Sequence[int] | None = None, window: int | None = None,
    ) -> Any: ...

    def paged_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any, scale: float,
        out: torch.Tensor | None = None, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
        window: int | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        """key / value (optional): the step's new keys and values in q's row order, already stored;
        a backend may read a chunk's own keys from them instead of the cache."""
        ...

    def build_shared_prefix_metadata(
        self, query_rows: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
        group_ids: Sequence[Hashable | None], prefix_lens: Sequence[int], block_size: int,
        device: torch.device | str, *, num_heads: int, num_kv_heads: int, window: int | None = None,
    ) -> Any: ...

    def shared_prefix_decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any, scale: float,
        out: torch.Tensor | None = None, window: int | None = None, softcap: float | None = None,
    ) -> torch.Tensor: ...

    def build_step_metadata(
        self, query_lens: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
        block_size: int, device: torch.device | str, *, num_heads: int, num_kv_heads: int,
        group_ids: Sequence[Hashable | None] | None = None, prefix_lens: Sequence[int] | None = None,
        window: int | None = None,
    ) -> StepAttentionMetadata: ...

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: StepAttentionMetadata,
        scale: float, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
        window: int | None = None, softcap: float | None = None,
    ) -> torch.Tensor: ...

    def graph_variant(self) -> AttentionBackend | None:
        """A backend whose decode metadata a CUDA graph can replay (see kernels.static_decode_plan),
        or None when this one cannot be captured."""
        ...


class _StepMixin:
    """build_step_metadata / attention in terms of the backend's four primitives."""

    # Decode rows outside any group of 2+: through the shared-prefix launch (True, one launch for
    # all decodes) or through paged attention (False: cheaper for the PyTorch references).
    shared_launch_for_plain_rows = True
    # Prefill chunks of a group's members whose prefix is already cached go through the group tiles
    # (each query token a row of the shared launch) when the chunk's rows (tokens x query heads per
    # KV head) and its own context after the prefix are both at most this many: then several members'
    # short chunks read the prefix once between them, where paged prefill gives each its own
    # under-filled tile reading the whole prefix. Longer chunks fill paged-prefill tiles on their
    # own, and per-token request tiles would re-read a long own context once per token. 0: off.
    group_prefill_max_rows = 64
    # How those chunks go: False, each query token a row of the shared-prefix launch; True, whole
    # chunks through the backend's build_group_prefill_metadata / group_prefill_attention.
    group_prefill_chunks = False

    def build_step_metadata(
        self,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str,
        *,
        num_heads: int,
        num_kv_heads: int,
        group_ids: Sequence[Hashable | None] | None = None,
        prefix_lens: Sequence[int] | None = None,
        window: int | None = None,
    ) -> StepAttentionMetadata:
        """One entry per scheduled chunk, in q's row order (chunk i owns the next query_lens[i] rows).

        group_ids[i] / prefix_lens[i]: the chunk's group and the tokens of that group's shared
        prefix (see `build_shared_prefix_batch`); None / 0 or omitted: no group. A prefill chunk uses
        its group only if the prefix lies wholly before its queries and the chunk is short (see
        `group_prefill_max_rows`). window: the largest sliding window of the layers the metadata
        serves (None: some layer attends to its whole context).
        """
        n = len(query_lens)
        gids = list(group_ids) if group_ids is not None else [None] * n
        plens = list(prefix_lens) if prefix_lens is not None else [0] * n
        if not (len(context_lens) == len(block_tables) == len(gids) == len(plens) == n):
            raise ValueError("per-chunk lists differ in length")
        ratio = max(1, num_heads // max(1, num_kv_heads))
        limit = self.group_prefill_max_rows
        # may chunk i use its group's tiles? (decode rows of a group always; prefill chunks if short)
        member = [
            gid is not None and plen > 0
            and (ql == 1 or (plen <= ctx - ql and ql * ratio <= limit and ctx - plen <= limit))
            for gid, plen, ql, ctx in zip(gids, plens, query_lens, context_lens)
        ]
        members: dict[Hashable, int] = {}
        for gid, m in zip(gids, member):
            if m:
                members[gid] = members.get(gid, 0) + 1
        pre: list[int] = []
        whole: list[int] = []  # grouped prefill chunks routed whole (group_prefill_chunks)
        starts: list[int] = []
        # the shared launch's rows, one per query token: its row of q, context length and chunk
        shared_rows: list[int] = []
        shared_ctx: list[int] = []
        shared_chunks: list[int] = []
        plain_rows = self.shared_launch_for_plain_rows
        row = 0
        for i, ql in enumerate(query_lens):
            starts.append(row)
            grouped = member[i] and members[gids[i]] >= 2
            if ql == 1 and (grouped or plain_rows):
                shared_rows.append(row)
                shared_ctx.append(context_lens[i])
                shared_chunks.append(i)
            elif grouped and self.group_prefill_chunks:
                whole.append(i)
            elif grouped:
                first_ctx = context_lens[i] - ql + 1
                shared_rows.extend(range(row, row + ql))
                shared_ctx.extend(range(first_ctx, first_ctx + ql))
                shared_chunks.extend([i] * ql)
            else:
                pre.append(i)
            row += ql
        paged = shared = group = None
        if whole:
            group = self.build_group_prefill_metadata(  # type: ignore[attr-defined]
                [starts[i] for i in whole], [query_lens[i] for i in whole], [context_lens[i] for i in whole],
                [block_tables[i] for i in whole], [gids[i] for i in whole], [plens[i] for i in whole],
                block_size, device, num_heads=num_heads, num_kv_heads=num_kv_heads, window=window,
            )
        if pre:
            paged = self.build_paged_metadata(  # type: ignore[attr-defined]
                [query_lens[i] for i in pre], [context_lens[i] for i in pre], [block_tables[i] for i in pre],
                block_size, device, num_heads=num_heads, num_kv_heads=num_kv_heads,
                query_starts=[starts[i] for i in pre], window=window,
            )
        if shared_rows:
            shared_gids = [gids[i] for i in shared_chunks]
            shared = self.build_shared_prefix_metadata(  # type: ignore[attr-defined]
                shared_rows, shared_ctx, [block_tables[i] for i in shared_chunks], shared_gids,
                [plens[i] if gid is not None else 0 for i, gid in zip(shared_chunks, shared_gids)],
                block_size, device, num_heads=num_heads, num_kv_heads=num_kv_heads, window=window,
            )
        return StepAttentionMetadata(paged=paged, shared=shared, num_tokens=row, group_prefill=group)

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: StepAttentionMetadata,
        scale: float, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
        window: int | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        """Attention of every row of q (each chunk's queries over its cached context, causal, within
        the layer's sliding `window` when given, scores soft-capped by `softcap` when given).
        key / value: the step's new keys and values (already stored), see `paged_attention`."""
        if q.shape[0] != meta.num_tokens:
            raise ValueError(f"q has {q.shape[0]} rows; the step metadata covers {meta.num_tokens}")
        out = torch.zeros_like(q) if meta.zero_uncovered else torch.empty_like(q)
        if meta.paged is not None:
            self.paged_attention(  # type: ignore[attr-defined]
                q, k_cache, v_cache, meta.paged, scale, out=out, key=key, value=value, window=window,
                softcap=softcap)
        if meta.shared is not None:
            self.shared_prefix_decode(  # type: ignore[attr-defined]
                q, k_cache, v_cache, meta.shared, scale, out=out, window=window, softcap=softcap)
        if meta.group_prefill is not None:
            self.group_prefill_attention(  # type: ignore[attr-defined]
                q, k_cache, v_cache, meta.group_prefill, scale, out=out, window=window, softcap=softcap)
        return out


class TorchBackend(_StepMixin):
    """The PyTorch references (the CPU path; also runs on CUDA, slowly)."""

    name = "torch"
    shared_launch_for_plain_rows = False

    def __init__(self) -> None:
        # one set per kind of plan, reused by every step (see GatherBuffers)
        self._paged_buffers = GatherBuffers()
        self._shared_buffers = GatherBuffers()
        self._group_buffers = GatherBuffers()
    # Members' prefill chunks of any length go through group prefill (kernels.group_prefill_torch):
    # the prefix read once per group, all members' queries in one attention call per bucket.
    group_prefill_max_rows = 1 << 30
    group_prefill_chunks = True

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        if cpu_fused.native_store_kv_usable(key, value, k_cache, slot_mapping):
            cpu_fused.native_store_kv(key, value, k_cache, v_cache, slot_mapping)
        else:
            store_kv_reference(key, value, k_cache, v_cache, slot_mapping)

    def build_paged_metadata(
        self, query_lens, context_lens, block_tables, block_size, device, *, num_heads: int = 0,
        num_kv_heads: int = 0, query_starts: Sequence[int] | None = None, window: int | None = None,
    ) -> TorchPagedPlan:
        batch = build_paged_batch(list(query_lens), list(context_lens), [list(t) for t in block_tables],
                                  block_size, torch.device(device), window=window)
        if query_starts is not None:
            # build_paged_batch places the chunks back to back from row 0: move them to their rows.
            starts = [int(s) for s in query_starts]
            decode = [s for s, ql in zip(starts, query_lens) if ql == 1]
            spans = [(s, ql, c) for s, ql, c in zip(starts, query_lens, context_lens) if ql != 1]
            batch = dataclasses.replace(
                batch,
                decode_query_index=torch.tensor(decode, dtype=torch.int64, device=batch.decode_query_index.device),
                prefill_spans=tuple((s, int(ql), int(c)) for s, ql, c in spans),
            )
        return plan_paged_torch(batch, self._paged_buffers)

    def paged_attention(self, q, k_cache, v_cache, meta: TorchPagedPlan, scale: float, out=None,
                        key=None, value=None, window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
        # paged_attention_reference's meaning, computed by its faster CPU form (kernels.paged_attention_torch)
        if out is None:
            out = torch.empty_like(q)
        return paged_attention_torch(q, k_cache, v_cache, meta, scale, out, key, value, window=window, softcap=softcap)

    def build_shared_prefix_metadata(
        self, query_rows, context_lens, block_tables, group_ids, prefix_lens, block_size, device, *,
        num_heads: int = 0, num_kv_heads: int = 0, window: int | None = None,
    ) -> TorchSharedPrefixPlan:
        batch = build_shared_prefix_batch(query_rows, context_lens, block_tables, group_ids, prefix_lens,
                                          block_size, device)
        return plan_shared_prefix_torch(batch, window, heads_per_kv=max(1, num_heads // max(1, num_kv_heads)),
                                        buffers=self._shared_buffers)

    def shared_prefix_decode(self, q, k_cache, v_cache, meta: TorchSharedPrefixPlan, scale: float, out=None,
                             window: int | None = None, softcap: float | None = None):
        # the batched form of shared_prefix_decode_reference (same meaning; one computation per bucket of groups)
        return shared_prefix_decode_torch(q, k_cache, v_cache, meta, scale, out=out, window=window, softcap=softcap)

    def build_group_prefill_metadata(
        self, query_starts, query_lens, context_lens, block_tables, group_ids, prefix_lens, block_size, device, *,
        num_heads: int, num_kv_heads: int, window: int | None = None,
    ) -> TorchGroupPrefillPlan:
        return plan_group_prefill_torch(query_starts, query_lens, context_lens, block_tables, group_ids, prefix_lens,
                                        block_size, device, max(1, num_heads // max(1, num_kv_heads)), window,
                                        buffers=self._group_buffers)

    def group_prefill_attention(self, q, k_cache, v_cache, meta: TorchGroupPrefillPlan, scale: float, out,
                                window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        # paged_attention_reference's meaning for those chunks, the prefix read once per group
        return group_prefill_torch(q, k_cache, v_cache, meta, scale, out, window=window, softcap=softcap)

    def graph_variant(self) -> None:
        """The references plan on the host inside attention: they cannot be captured in a graph."""
        return None


class TritonBackend(_StepMixin):
    """The Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests)."""

    name = "triton"

    def __init__(self, group_block_m: int | None = None, kv_split: int | None = None) -> None:
        # Imported here so that merely choosing the torch backend never defines Triton kernels
        # (TRITON_INTERPRET must be set before they are defined).
        from kernels import paged_prefill, shared_prefix_decode, store_kv

        self._store = store_kv
        self._prefill = paged_prefill
        self._decode = shared_prefix_decode
        self.group_block_m = group_block_m
        self.kv_split = kv_split

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        self._store.store_kv(key, value, k_cache, v_cache, slot_mapping)

    def build_paged_metadata(
        self, query_lens, context_lens, block_tables, block_size, device, *, num_heads: int,
        num_kv_heads: int, query_starts: Sequence[int] | None = None, window: int | None = None,
    ):
        # the kernels skip blocks outside each call's window themselves: the metadata is window-free
        return self._prefill.build_paged_prefill_metadata(
            query_lens, context_lens, block_tables, block_size, device, num_heads, num_kv_heads,
            query_starts=query_starts,
        )

    def paged_attention(self, q, k_cache, v_cache, meta, scale: float, out=None, key=None, value=None,
                        window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        # the kernel reads every key from the cache (key / value unused)
        return self._prefill.paged_prefill(q, k_cache, v_cache, meta, scale, out=out, window=window, softcap=softcap)

    def build_shared_prefix_metadata(
        self, query_rows, context_lens, block_tables, group_ids, prefix_lens, block_size, device, *,
        num_heads: int, num_kv_heads: int, window: int | None = None,
    ):
        batch = build_shared_prefix_batch(query_rows, context_lens, block_tables, group_ids, prefix_lens,
                                          block_size, device)
        return self._decode.plan_shared_prefix_decode(batch, num_heads, num_kv_heads,
                                                      block_m=self.group_block_m, kv_split=self.kv_split)

    def shared_prefix_decode(self, q, k_cache, v_cache, meta, scale: float, out=None,
                             window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        return self._decode.shared_prefix_decode(q, k_cache, v_cache, meta, scale, out=out, window=window,
                                                 softcap=softcap)

    def graph_variant(self) -> TritonBackend:
        """The same kernels with a fixed group-tile height, so that every decode plan of a CUDA
        graph launches the one kernel variant it captured (the default height follows the largest
        group of the step)."""
        return TritonBackend(group_block_m=self.group_block_m or GRAPH_GROUP_BLOCK_M, kv_split=self.kv_split)


def select_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """"auto": Triton on CUDA, the PyTorch references elsewhere; "torch" / "triton": that one.

    "triton" needs a CUDA device, or TRITON_INTERPRET=1 (Triton's CPU interpreter: slow, for tests).
    Raises ValueError for an unknown name or an impossible combination.
    """
    dev = torch.device(device)
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        name = "triton" if dev.type == "cuda" else "torch"
    if name == "torch":
        return TorchBackend()
    problem = backend_device_problem(name, dev.type)
    if problem is not None:
        raise ValueError(problem)
    try:
        return TritonBackend()
    except ImportError as exc:  # pragma: no cover - triton is a dependency
        raise ValueError(f"the triton attention backend is unavailable: {exc}") from exc
