"""Global prefix planning (numpy only: no torch, no tables): token sequences -> sorted order with
neighbour LCPs -> compact trie -> the execution plan `run` follows and the report `analyze` prints.

packed.py (PackedSequences, vectorized LCP), sort.py (in-memory sort), trie.py (streaming trie
builder), chunks.py (cutting a sorted job into chunks fed one at a time), partition.py (splitting it over
replicas by prefix group), execution_plan.py (shared prefixes, run order, decode groups), prefix_plan.py (whole-input
plan + report numbers), batchllm_baseline.py and lru_simulation.py (what other strategies would do).
"""
from engine.planning.chunks import ChunkCuts, PlanChunk, cut_sorted_rows, unique_prompt_tokens
from engine.planning.execution_plan import (
    DecodeGroups,
    ExecutionPlan,
    build_execution_plan,
    decode_groups,
    plan_execution,
)
from engine.planning.lru_simulation import LruPrefixCache, LruResult
from engine.planning.packed import PackedSequences
from engine.planning.partition import Partition, group_starts, partition_sorted
from engine.planning.sort import SortedSequences, sort_sequences
from engine.planning.prefix_plan import (
    GroupSizeStats,
    PrefixPlan,
    PrefixPlanReport,
    SortedStreamPlanner,
    plan_prefixes,
    plan_prefixes_from_sorted_stream,
)

__all__ = [
    "ChunkCuts",
    "PlanChunk",
    "cut_sorted_rows",
    "unique_prompt_tokens",
    "DecodeGroups",
    "ExecutionPlan",
    "GroupSizeStats",
    "LruPrefixCache",
    "LruResult",
    "PackedSequences",
    "Partition",
    "group_starts",
    "partition_sorted",
    "PrefixPlan",
    "PrefixPlanReport",
    "SortedSequences",
    "SortedStreamPlanner",
    "sort_sequences",
    "build_execution_plan",
    "decode_groups",
    "plan_execution",
    "plan_prefixes",
    "plan_prefixes_from_sorted_stream",
]
