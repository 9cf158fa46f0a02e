"""Pure tensor functions: each Triton kernel beside its launcher and a PyTorch reference."""
import os
from pathlib import Path


def cache_root() -> Path:
    """batchllm's cache directory: `$BATCHLLM_CACHE_DIR`, else `~/.cache/batchllm` (built kernels, the demo
    model). Here, the lowest package, so the engine and the kernels read one definition."""
    env = os.environ.get("BATCHLLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "batchllm"


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1). Importing this
    package does not import Triton, so the PyTorch path can ask without it."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_device_problem(name: str, device_type: str) -> str | None:
    """Why the attention backend `name` cannot run on a `device_type` device ("cpu", "cuda"), or None.
    Here, beside `triton_interpreting`, so a caller can ask before importing torch or Triton."""
    if name == "triton" and device_type != "cuda" and not triton_interpreting():
        return (
            f"the triton attention backend needs a CUDA device (got {device_type}); use --attention-backend "
            "torch, or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) CPU interpreter"
        )
    return None
