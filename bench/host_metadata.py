"""Host cost of turning one step's metadata lists into tensors: torch.tensor(list) vs the numpy
route `kernels.host_tensors.host_tensor` takes (ids, positions and cache slots of an 8192-token
prefill step, 37 chunks of 221 tokens). On a GPU this host time comes before every launch of a step.

    python bench/host_metadata.py [--tokens 8192] [--repeat 50]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.host_tensors import host_tensor  # noqa: E402


def step_lists(tokens: int, chunk: int = 221, block_size: int = 16) -> tuple[list[int], list[int], list[int]]:
    rng = random.Random(0)
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    while len(ids) < tokens:
        start = rng.randrange(0, 2000)
        table = list(range(len(ids), len(ids) + (start + chunk) // block_size + 1))
        ids.extend(rng.randrange(128000) for _ in range(chunk))
        positions.extend(range(start, start + chunk))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + chunk))
    return ids[:tokens], positions[:tokens], slots[:tokens]


def ms_per_step(convert, lists, repeat: int) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        for values in lists:
            convert(values)
    return (time.perf_counter() - t) / repeat * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args()
    lists = step_lists(args.tokens)
    torch_ms = ms_per_step(lambda v: torch.tensor(v, dtype=torch.int64), lists, args.repeat)
    numpy_ms = ms_per_step(lambda v: host_tensor(v, torch.int64), lists, args.repeat)
    print(f"{args.tokens} tokens x 3 lists: torch.tensor {torch_ms:.2f} ms/step, host_tensor (numpy) {numpy_ms:.2f} ms/step")


if __name__ == "__main__":
    main()
