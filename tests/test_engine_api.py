"""The engine's public API: everything the CLI uses is importable from `engine`, and only the names
that need torch load it (so `batchllm --help` and `analyze` stay torch-free)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    return done.stdout.strip()


def test_torch_free_names_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from engine import (ConfigError, EngineConfig, EngineError, LruPrefixCache, ModelLoadError,\n"
        "    PackedSequences, SamplingParams, StructuredOutput, Tokenizer, check_device, check_engine_config,\n"
        "    compile_constraint, load_model_config, plan_prefixes, plan_prefixes_from_sorted_stream)\n"
        "print('torch' in sys.modules)"
    )
    assert _python(code) == "False"


def test_cli_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from batchllm_cli.app import app\n"
        "codes = [CliRunner().invoke(app, args).exit_code for args in (['--help'], ['run', '--help'], ['analyze', '--help'])]\n"
        "print(codes, 'torch' in sys.modules)"
    )
    assert _python(code) == "[0, 0, 0] False"


def test_every_exported_name_resolves() -> None:
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
    assert engine.LLMEngine.__name__ == "LLMEngine"
