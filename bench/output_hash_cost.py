"""What batchllm's file checks cost on a large file: the sha256 of the output (completion marker, `status`,
the re-run check), the blake2b content hash of the input (fingerprint, changed-input check) and the
changed-input check when the input's stat identity is unchanged (no read at all).

    python bench/output_hash_cost.py [--gib 1] [--dir /tmp]

Writes bench/results/output_hash_cost_cpu.json. Times are wall-clock seconds of one pass each, with the
file in the page cache after the first pass (the usual case right after a job wrote it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import git_commit, results_path  # noqa: E402  (bench/)
from batchllm_cli.fingerprint import build_fingerprint, file_digest, input_change  # noqa: E402
from batchllm_cli.marker import hash_output  # noqa: E402


def _timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    path = Path(args.dir) / f"batchllm-hash-bench-{os.getpid()}.bin"
    size = int(args.gib * 2**30)
    try:
        with path.open("wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        old = time.time() - 3600  # a settled file (see fingerprint.settled_identity): ctime cannot be set, so wait
        os.utime(path, (old, old))
        time.sleep(3.1)
        hash_output(path)  # warm the page cache
        sha = [_timed(lambda: hash_output(path)) for _ in range(3)]
        blake = [_timed(lambda: file_digest(path)) for _ in range(2)]
        fp = build_fingerprint(input_id=str(path.resolve()), input_files=[path], limit=None, skip_bad_rows=False,
                               id_column=None, template_text="",
                               model_dir=path.parent, chat=False, sampling={k: None for k in (
                                   "max_tokens", "temperature", "top_p", "top_k", "seed", "stop")},
                               nulls="error", truncate=None, dtype="auto")
        unchanged = [_timed(lambda: input_change(path, fp)) for _ in range(3)]
        no_identity = [_timed(lambda: input_change(path, fp | {"input.identity": None})) for _ in range(2)]
    finally:
        path.unlink(missing_ok=True)
    gib = size / 2**30
    result = {
        "bench": "output_hash_cost",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "bench/output_hash_cost.py " + " ".join(sys.argv[1:]),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "git": git_commit("batchllm_cli"),
        "file_gib": gib,
        "sha256_output_s": [round(x, 3) for x in sha],
        "sha256_gib_per_s": round(gib / min(sha), 3),
        "blake2b_input_s": [round(x, 3) for x in blake],
        "input_check_identity_unchanged_s": [round(x, 6) for x in unchanged],
        "input_check_rehash_s": [round(x, 3) for x in no_identity],
        "fingerprint_identity_settled": fp["input.identity"] is not None,
    }
    out = results_path("output_hash_cost", "cpu")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
