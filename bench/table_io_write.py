"""What literal paths and verbatim values cost: read (validate + stream) and write_output of an N-row CSV
input, against DuckDB's own COPY of the same join (the previous output path) as the baseline.

    python bench/table_io_write.py --rows 1000000

Writes bench/results/table_io_write_cpu.json (seconds; writes: least and median of --repeats,
interleaved with the baseline).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from batchllm_cli.durable import fsync_file
from batchllm_cli.table_io import ROW_ID, TableSource, write_output

REPO = Path(__file__).resolve().parent.parent


def make_input(path: Path, rows: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "zip", "price", "text"])
        for i in range(rows):
            w.writerow([i, f"{i % 100000:05d}", f"{i % 977}.50", f"row {i} with some words, and a comma"])


def median_s(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-table-io-"))
    inp = tmp / "in[1].csv"
    make_input(inp, args.rows)
    results = pa.table({ROW_ID: pa.array(range(args.rows), pa.int64()),
                        "answer": pa.array([f"answer {i}" for i in range(args.rows)])})
    out: dict = {"rows": args.rows, "repeats": args.repeats, "duckdb": duckdb.__version__, "pyarrow": pa.__version__,
                 "machine": platform.processor() or platform.machine(),
                 "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True).stdout.strip()}

    def read_all() -> None:
        with TableSource(inp) as src:
            src.validate()
            for _ in src.batches(8192):
                pass

    out["read_validate_and_stream_s"] = median_s(read_all, args.repeats)
    for fmt in ("parquet", "csv", "jsonl"):
        target = tmp / f"out.{fmt}"

        def ours() -> None:
            with TableSource(inp) as src:
                write_output(src, results, target)

        def duckdb_copy() -> None:  # the previous path: one COPY of the join, no Arrow round trip
            with TableSource(inp) as src:
                con = duckdb.connect()
                con.register("res", results)
                rid = f'"{ROW_ID}"'
                query = (f"SELECT src.* EXCLUDE ({rid}), res.answer FROM {src.numbered_sql()} AS src "
                         f"LEFT JOIN res ON src.{rid} = res.{rid} ORDER BY src.{rid}")
                opts = {"parquet": "FORMAT parquet", "csv": "FORMAT csv, HEADER true", "jsonl": "FORMAT json"}[fmt]
                con.execute(f"COPY ({query}) TO '{tmp / ('base.' + fmt)}' ({opts})")
                con.close()
                fsync_file(tmp / ("base." + fmt))  # as the previous path did before its rename

        # Interleaved, so both see the same load on a shared machine; the least time is the cost.
        ours_t, base_t = [], []
        for _ in range(args.repeats):
            ours_t.append(median_s(ours, 1))
            base_t.append(median_s(duckdb_copy, 1))
        out[f"write_{fmt}_s"] = {"min": min(ours_t), "median": statistics.median(ours_t)}
        out[f"write_{fmt}_duckdb_copy_s"] = {"min": min(base_t), "median": statistics.median(base_t)}
        out[f"write_{fmt}_bytes"] = target.stat().st_size
    path = REPO / "bench" / "results" / "table_io_write_cpu.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
