"""GPU test files run their checks with compiled Triton kernels, also under tests/conftest.py, which
sets TRITON_INTERPRET=1 for the CPU tests: there they re-launch themselves in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def rerun_gpu_tests_compiled(test_file: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="0")
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(Path(test_file))],
        cwd=repo, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
