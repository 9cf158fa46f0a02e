"""Greedy rows take the first of equally likely tokens (the same answer on every run and engine),
in an all-greedy batch and beside sampled rows."""
from __future__ import annotations

import torch

from engine.sampler import SamplingTensors, sample


def test_greedy_takes_the_first_maximal_token() -> None:
    logits = torch.full((3, 50), -1.0)
    logits[0, [7, 3, 40]] = 2.0  # a three-way tie: token 3 first
    logits[1, [49, 48]] = 30.0  # sampled from these two (the others are e^-31 as likely)
    logits[2, 0] = 1.0
    empty = torch.empty(0)
    greedy = SamplingTensors(empty, empty, empty, empty, empty, all_greedy=True, any_top_k=False, any_top_p=False)
    assert sample(logits, greedy).tolist() == [3, 48, 0]
    mixed = SamplingTensors(
        temperatures=torch.tensor([0.0, 1.0, 0.0]), top_ks=torch.zeros(3, dtype=torch.int64), top_ps=torch.ones(3),
        keys=torch.tensor([1, 2, 3]), steps=torch.zeros(3, dtype=torch.int64),
        all_greedy=False, any_top_k=False, any_top_p=False)
    out = sample(logits, mixed).tolist()
    assert out[0] == 3 and out[2] == 0 and out[1] in (48, 49)
