"""Pure tensor functions: each Triton kernel beside its launcher and a PyTorch reference."""
import os


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1). Importing this
    package does not import Triton, so the PyTorch path can ask without it."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
