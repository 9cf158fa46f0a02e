"""batchllm command line: tables, templates, files and people (never tensors)."""
from __future__ import annotations

__all__ = ["__version__"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("batchllm")
except Exception:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
