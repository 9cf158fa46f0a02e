"""A short job's start from the shell: `batchllm run` on CPU imports only what its path needs, and the
fast exit (batchllm_cli/fast_exit.py) still does what a normal exit does (atexit handlers, exit codes,
flushed output)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent

# Modules that cost seconds to import and that a plain CPU run has no use for.
_UNNEEDED = ("transformers", "torch._dynamo", "sympy", "triton", "xgrammar")

# Runs the console entry point in a fresh interpreter; an atexit handler registered before it records
# what was imported and that the handler ran (batchllm leaves through exit_now).
_DRIVER = """
import atexit, json, sys
path = sys.argv[1]
def record():
    with open(path, "w") as f:
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] in {"transformers", "torch", "sympy", "triton", "xgrammar"}), f)
atexit.register(record)
sys.argv = ["batchllm", *sys.argv[2:]]
from batchllm_cli.app import main
main()
"""


def _batchllm(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    seen = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(seen), *args],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    return done, json.loads(seen.read_text())


def test_cpu_run_imports_no_compiler_stack_and_exits_cleanly(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "in.csv").write_text("q\nhello world\n")
    (tmp_path / "t.j2").write_text("Say: {{ q }}\n")
    done, modules = _batchllm(tmp_path, env, "run", "in.csv", "--template", "t.j2", "--output", "out.parquet",
                              "--device", "cpu", "--max-tokens", "2", "--kv-cache-memory", "16MiB")
    assert done.returncode == 0, done.stderr
    assert "done: 1 rows (1 ok)" in done.stderr  # the summary was flushed before the process left
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 1
    assert (tmp_path / "out.parquet.success.json").is_file()
    assert "torch" in modules  # the handler ran after the engine did
    assert [m for m in modules if m.startswith(_UNNEEDED)] == []
    assert not list(tmp_path.glob("out.parquet.lock*"))


def test_usage_error_keeps_its_exit_code(tmp_path: Path, env: dict[str, str]) -> None:
    done, modules = _batchllm(tmp_path, env, "run", "missing.csv", "--template", "t.j2", "--output", "out.parquet")
    assert done.returncode == 2, done.stderr
    assert "missing.csv" in done.stderr
    assert "torch" not in modules


def test_a_ctrl_c_during_the_exit_teardown_does_not_print_a_traceback() -> None:
    # Ctrl-C pressed several times: one landing in an atexit handler (torch's) printed
    # "Exception ignored in atexit callback ... KeyboardInterrupt" after the run had ended.
    import subprocess
    import sys

    code = (
        "import atexit, os, signal, time\n"
        "from batchllm_cli.fast_exit import exit_now\n"
        "def late():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "atexit.register(late)\n"
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (3, "")
