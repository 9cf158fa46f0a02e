"""Decoder-only transformer models (Llama, Qwen2, Qwen3 families) written for the paged engine."""
