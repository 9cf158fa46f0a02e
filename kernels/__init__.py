"""Pure tensor functions: each Triton kernel beside its launcher and a PyTorch reference."""
