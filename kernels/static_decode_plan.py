"""Fixed-address buffers for shared-prefix decode plans, so a decode step can be a CUDA graph.

A captured CUDA graph replays kernel launches with the pointers, grid sizes and scalar arguments
they were captured with. `shared_prefix_decode` plans change every step (tile count, parts, table
widths), so a graph cannot launch them directly. A `StaticDecodePlan` owns buffers sized to a
`DecodePlanCapacity` and a `SharedPrefixDecodePlan` viewing all of them at full capacity; each step
`load()`s that step's plan into the buffers. The tail beyond the step's real entries is padding that
the kernels skip: tiles with f0 == f1 (no rows, empty KV range), and merge entries naming a dummy
row (index `rows`) with zero parts, whose merge writes nothing.

The static plan's `batch` carries no host_* numbers: it is for the Triton launcher only, never for
the PyTorch reference (which plans on the host).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.shared_prefix_attention import SharedPrefixBatch
from kernels.shared_prefix_decode import SharedPrefixDecodePlan

__all__ = ["DecodePlanCapacity", "StaticDecodePlan"]


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


@dataclass(frozen=True)
class DecodePlanCapacity:
    rows: int  # decode rows
    groups: int
    tiles: int
    parts: int
    table_width: int  # blocks per row (and per group prefix) table
    num_heads: int
    num_kv_heads: int
    block_size: int
    block_m_group: int
    block_m_row: int
    kv_split: int

    def holds(self, plan: SharedPrefixDecodePlan) -> bool:
        b = plan.batch
        return (
            b.num_rows <= self.rows
            and b.num_groups <= self.groups
            and plan.num_tiles <= self.tiles
            and plan.num_parts <= self.parts
            and b.block_tables.shape[1] <= self.table_width
            and b.prefix_block_tables.shape[1] <= self.table_width
            and (plan.num_heads, plan.num_kv_heads, b.block_size) == (self.num_heads, self.num_kv_heads, self.block_size)
            and (plan.block_m_group, plan.block_m_row, plan.kv_split)
            == (self.block_m_group, self.block_m_row, self.kv_split)
        )

    @classmethod
    def fitting(cls, plan: SharedPrefixDecodePlan, rows: int, table_width: int, headroom: int = 2) -> DecodePlanCapacity:
        """A capacity for `rows` rows holding `plan`, with `headroom` x its tiles and parts (they grow
        as the rows' contexts grow), counts rounded up to powers of two."""
        return cls(
            rows=rows, groups=_pow2_at_least(max(plan.batch.num_groups, 1)),
            tiles=_pow2_at_least(headroom * max(plan.num_tiles, rows)),
            parts=_pow2_at_least(headroom * max(plan.num_parts, 1)), table_width=table_width,
            num_heads=plan.num_heads, num_kv_heads=plan.num_kv_heads, block_size=plan.batch.block_size,
            block_m_group=plan.block_m_group, block_m_row=plan.block_m_row, kv_split=plan.kv_split,
        )

    def grown_for(self, plan: SharedPrefixDecodePlan) -> DecodePlanCapacity:
        """The smallest capacity holding both this one and `plan` (counts rounded up to powers of two)."""
        b = plan.batch

        def up(have: int, need: int) -> int:
            return have if need <= have else _pow2_at_least(need)

        width = max(b.block_tables.shape[1], b.prefix_block_tables.shape[1])
        return DecodePlanCapacity(
            rows=max(self.rows, b.num_rows), groups=up(self.groups, b.num_groups), tiles=up(self.tiles, plan.num_tiles),
            parts=up(self.parts, plan.num_parts), table_width=max(self.table_width, width), num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, block_size=self.block_size, block_m_group=self.block_m_group,
            block_m_row=self.block_m_row, kv_split=self.kv_split,
        )


@dataclass
class StaticDecodePlan:
    capacity: DecodePlanCapacity
    plan: SharedPrefixDecodePlan  # views on the buffers at full capacity
    _tiles_in_use: int = field(default=0)
    _merges_in_use: int = field(default=0)

    @classmethod
    def allocate(cls, cap: DecodePlanCapacity, device: torch.device | str) -> StaticDecodePlan:
        def i32(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int32, device=device)

        batch = SharedPrefixBatch(
            query_index=torch.zeros(cap.rows + 1, dtype=torch.int64, device=device),  # [rows]: the dummy row
            block_tables=i32(cap.rows, cap.table_width),
            table_starts=i32(cap.rows),
            context_lens=i32(cap.rows),
            suffix_starts=i32(cap.rows),
            group_row_starts=i32(cap.groups + 1),
            prefix_block_tables=i32(cap.groups, cap.table_width),
            prefix_lens=i32(cap.groups),
            block_size=cap.block_size,
            host_query_index=(),
            host_context_lens=(),
            host_suffix_starts=(),
            host_group_row_starts=(),
            host_prefix_lens=(),
        )
        plan = SharedPrefixDecodePlan(
            batch=batch,
            tile_f0=i32(cap.tiles),
            tile_f1=i32(cap.tiles),
            tile_table=i32(cap.tiles),
            tile_kv_lo=i32(cap.tiles),
            tile_kv_hi=i32(cap.tiles),
            tile_part=torch.full((cap.tiles,), -1, dtype=torch.int32, device=device),
            row_part_start=i32(cap.rows + 1),
            row_num_parts=i32(cap.rows + 1),  # the dummy row has no parts
            merge_rows=torch.full((cap.rows,), cap.rows, dtype=torch.int32, device=device),
            group_tile_count=i32(1),
            num_group_tiles=0,
            num_parts=cap.parts,
            num_heads=cap.num_heads,
            num_kv_heads=cap.num_kv_heads,
            block_m_group=cap.block_m_group,
            block_m_row=cap.block_m_row,
            kv_split=cap.kv_split,
        )
        return cls(cap, plan)

    def load(self, step: SharedPrefixDecodePlan) -> None:
        """Copies one step's plan into the buffers (device-to-device, no host sync)."""
        assert self.capacity.holds(step), "the step's plan does not fit this static plan"
        dst, src = self.plan, step
        db, sb = dst.batch, src.batch
        r, g, t, m = sb.num_rows, sb.num_groups, src.num_tiles, int(src.merge_rows.shape[0])
        db.query_index[:r].copy_(sb.query_index, non_blocking=True)
        db.block_tables[:r, : sb.block_tables.shape[1]].copy_(sb.block_tables, non_blocking=True)
        db.table_starts[:r].copy_(sb.table_starts, non_blocking=True)
        db.context_lens[:r].copy_(sb.context_lens, non_blocking=True)
        db.suffix_starts[:r].copy_(sb.suffix_starts, non_blocking=True)
        db.group_row_starts[: g + 1].copy_(sb.group_row_starts, non_blocking=True)
        if g:
            db.prefix_block_tables[:g, : sb.prefix_block_tables.shape[1]].copy_(sb.prefix_block_tables, non_blocking=True)
            db.prefix_lens[:g].copy_(sb.prefix_lens, non_blocking=True)
        for name in ("tile_f0", "tile_f1", "tile_table", "tile_kv_lo", "tile_kv_hi", "tile_part"):
            getattr(dst, name)[:t].copy_(getattr(src, name), non_blocking=True)
        if t < self._tiles_in_use:  # tiles the previous step used become no-op padding again
            for name in ("tile_f0", "tile_f1", "tile_kv_lo", "tile_kv_hi"):
                getattr(dst, name)[t : self._tiles_in_use].zero_()
            dst.tile_part[t : self._tiles_in_use].fill_(-1)
        dst.row_part_start[:r].copy_(src.row_part_start, non_blocking=True)
        dst.row_num_parts[:r].copy_(src.row_num_parts, non_blocking=True)
        dst.merge_rows[:m].copy_(src.merge_rows, non_blocking=True)
        if m < self._merges_in_use:
            dst.merge_rows[m : self._merges_in_use].fill_(self.capacity.rows)
        dst.group_tile_count.copy_(src.group_tile_count, non_blocking=True)
        self._tiles_in_use, self._merges_in_use = t, m
