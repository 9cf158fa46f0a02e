"""Shared test setup: CPU-friendly environment and session-cached tiny model directories."""
from __future__ import annotations

import os

# Must run before anything imports triton: kernels defined afterwards run in the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The test machines are small and shared; one intra-op thread avoids oversubscription and keeps
# float reductions in a fixed order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# The repo root (engine, kernels, ...) must import even when pytest is run as `pytest` rather than
# `python -m pytest`; model_factory lives beside the tests and is imported as a plain module.
_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import model_factory  # noqa: E402


@pytest.fixture
def machine_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """`machine_zone(name)` sets the process's $TZ (DuckDB takes its default session zone from it, and
    Python its local time); the old zone is back after the test."""

    def set_zone(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(name)` -> directory of the variant `model_factory.VARIANTS[name]`, built once."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"model-{name}")
            cache[name] = model_factory.build_model_dir(model_factory.VARIANTS[name], out)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], torch.nn.Module]:
    """`hf_model(name)` -> the transformers model read back from the variant's directory, cached."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = model_factory.load_hf_model(tiny_model_dir(name))
        return cache[name]

    return get


@pytest.fixture
def env(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The demo model found through BATCHLLM_CACHE_DIR: here, and in the returned env of subprocesses."""
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(demo_model_dir.parent))
    return {"BATCHLLM_CACHE_DIR": str(demo_model_dir.parent)}


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in demo model, generated into a session temp dir (never the user's cache)."""
    from engine.demo_model import ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything loads model weights (a refusal must come before the model loads)."""
    import engine.llm_engine

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("this must be decided before the model loads")

    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", forbidden)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """BATCHLLM_INSTAFAIL=1 prints a failure's traceback as soon as it happens: GPU checks run under a
    time cap (bench/gpu_session.sh), and a run cut there never reaches pytest's closing summary."""
    if report.failed and os.environ.get("BATCHLLM_INSTAFAIL") == "1":
        sys.stderr.write(f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
        sys.stderr.flush()
