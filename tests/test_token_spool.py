"""The token spool (batchllm_cli/token_spool.py): rows read back packed in any order, in no more
memory than the result (the scale-out driver reads each replica's part this way)."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np

from batchllm_cli.token_spool import TokenSpool


def _spool(tmp_path: Path, rows: int, seed: int = 0) -> tuple[TokenSpool, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    spool = TokenSpool(tmp_path)
    written = []
    for start in range(0, rows, 1000):  # appended batch by batch, as tokenize_rows does
        lens = rng.integers(0, 200, size=min(1000, rows - start))
        batch = [rng.integers(0, 50_000, size=n, dtype=np.int32) for n in lens]
        spool.append(np.arange(start, start + len(lens)), np.concatenate(batch), lens)
        written += batch
    return spool, written


def test_packed_rows_are_the_rows_in_the_order_asked(tmp_path: Path) -> None:
    spool, written = _spool(tmp_path, 3000)
    rows = np.random.default_rng(1).permutation(3000)[:1234]
    tokens, offsets = spool.packed_rows(rows)
    assert offsets[0] == 0 and len(offsets) == len(rows) + 1 and offsets[-1] == len(tokens)
    for i, r in enumerate(rows.tolist()):
        assert np.array_equal(tokens[offsets[i] : offsets[i + 1]], written[r])
    empty_tokens, empty_offsets = spool.packed_rows(np.zeros(0, dtype=np.int64))
    assert len(empty_tokens) == 0 and empty_offsets.tolist() == [0]


def test_a_quarter_of_the_rows_takes_about_a_quarter_of_the_spool_in_memory(tmp_path: Path) -> None:
    spool, _ = _spool(tmp_path, 40_000)
    spool_bytes = 4 * spool.tokens
    rows = np.random.default_rng(2).permutation(40_000)[:10_000]
    spool.offsets  # noqa: B018  (built once, as the driver has it before reading parts)
    tracemalloc.start()
    try:
        tokens, _ = spool.packed_rows(rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the result (~1/4 of the spool) and per-row bookkeeping; reading the whole spool would be 1x
    assert peak < 0.45 * spool_bytes, (peak, spool_bytes, tokens.nbytes)
