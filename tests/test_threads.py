"""The engine's CPU thread policy: passive OpenMP waiting unless the user chose otherwise, set
before torch loads; BATCHLLM_NUM_THREADS read and checked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.threads import SPIN_COUNT, THREADS_ENV, configure_openmp_env, requested_threads

ROOT = Path(__file__).resolve().parents[1]


def _env_after_import(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra | {"PYTHONPATH": str(ROOT)}
    code = "import engine, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_importing_the_engine_asks_for_passive_waiting_before_torch_loads() -> None:
    assert _env_after_import({}) == "PASSIVE False"


def test_a_policy_the_user_set_is_kept() -> None:
    assert _env_after_import({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE False"
    env = {"OMP_WAIT_POLICY": "active"}
    configure_openmp_env(env)
    assert env == {"OMP_WAIT_POLICY": "active"}


def test_thread_count_override() -> None:
    assert requested_threads({}) is None
    assert requested_threads({THREADS_ENV: " 3 "}) == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=THREADS_ENV):
            requested_threads({THREADS_ENV: bad})


def test_a_short_spin_is_added_only_when_the_user_chose_neither_policy_nor_thread_count() -> None:
    env: dict[str, str] = {}
    configure_openmp_env(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": SPIN_COUNT}
    env = {"GOMP_SPINCOUNT": "0"}
    configure_openmp_env(env)
    assert env == {"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    configure_openmp_env(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for fixed in (THREADS_ENV, "OMP_NUM_THREADS"):  # a fixed count has no governor: no spin either
        env = {fixed: "1"}
        configure_openmp_env(env)
        assert env == {fixed: "1", "OMP_WAIT_POLICY": "PASSIVE"}
