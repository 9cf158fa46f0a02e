"""Global prefix planning (numpy only: no torch, no tables): token sequences -> sorted order with
neighbour LCPs -> compact trie -> the execution plan `run` follows and the report `analyze` prints.

packed.py (PackedSequences, vectorized LCP), sort.py (in-memory sort), trie.py (streaming trie
builder), execution_plan.py (shared prefixes, run order, decode groups), prefix_plan.py (whole-input
plan + report numbers), batchllm_baseline.py and lru_simulation.py (what other strategies would do).
"""
from engine.planning.execution_plan import (
    DecodeGroups,
    ExecutionPlan,
    build_execution_plan,
    decode_groups,
    plan_execution,
)
from engine.planning.lru_simulation import LruPrefixCache, LruResult
from engine.planning.packed import PackedSequences
from engine.planning.prefix_plan import (
    GroupSizeStats,
    PrefixPlan,
    PrefixPlanReport,
    plan_prefixes,
    plan_prefixes_from_sorted_stream,
)

__all__ = [
    "DecodeGroups",
    "ExecutionPlan",
    "GroupSizeStats",
    "LruPrefixCache",
    "LruResult",
    "PackedSequences",
    "PrefixPlan",
    "PrefixPlanReport",
    "build_execution_plan",
    "decode_groups",
    "plan_execution",
    "plan_prefixes",
    "plan_prefixes_from_sorted_stream",
]
