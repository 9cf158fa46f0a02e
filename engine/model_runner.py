"""Owns the model weights and the KV cache; turns scheduled chunks into one forward pass."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.loader import load_model
from engine.model_config import ModelConfig
from engine.sampler import SamplingTensors, sample
from engine.scheduler import ScheduledChunk
from engine.step_context import StepContext
from kernels.attention_backend import select_backend

_CPU_DEFAULT_KV_FRACTION = 0.10
_CPU_DEFAULT_KV_MAX = 4 << 30
_CUDA_KV_FRACTION_OF_FREE = 0.8


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but PyTorch sees no CUDA device; use --device cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _system_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, max_model_len: int) -> None:
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.block_size = cfg.block_size
        self.model = load_model(Path(cfg.model_dir), model_cfg, self.device, self.dtype, max_model_len)
        self.num_blocks = self._num_kv_blocks()
        shape = (model_cfg.num_layers, 2, self.num_blocks, cfg.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        # Uninitialised on purpose: attention only ever reads slots that were written.
        self.kv_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = tuple((self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model_cfg.num_layers))
        try:
            self.attention_backend = select_backend(cfg.attention_backend, self.device)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"--attention-backend {cfg.attention_backend}: {exc}") from exc

    def _num_kv_blocks(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        block_bytes = self.model_cfg.kv_bytes_per_token * element * self.block_size
        budget = self.cfg.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                budget = int(torch.cuda.mem_get_info(self.device)[0] * _CUDA_KV_FRACTION_OF_FREE)
            else:
                budget = min(_CPU_DEFAULT_KV_MAX, int(_system_memory_bytes() * _CPU_DEFAULT_KV_FRACTION))
        num_blocks = budget // block_bytes
        if self.cfg.kv_cache_tokens is not None:
            num_blocks = min(num_blocks, -(-self.cfg.kv_cache_tokens // self.block_size))
        if num_blocks < 1:
            raise ConfigError(
                f"The KV cache budget holds no block of {self.block_size} tokens ({block_bytes} bytes each); "
                "raise --kv-cache-memory."
            )
        return int(num_blocks)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], block_copies: list[tuple[int, int]] = ()) -> list[int]:
        """One forward pass over the chunks; returns a new token for each chunk that samples.

        block_copies: (src, dst) KV blocks copied first (copy-on-write of shared partial blocks).
        A chunk completing a logits-keeping shared prefix leaves its last logits on the prefix;
        a zero-token chunk samples from its prefix's kept logits without a forward pass.
        """
        if block_copies:
            src = torch.tensor([c[0] for c in block_copies], device=self.device)
            dst = torch.tensor([c[1] for c in block_copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        computed = [c for c in chunks if c.num_tokens > 0]
        hidden_rows: dict[int, int] = {}  # chunk position in `chunks` -> row of its last token
        hidden = self._forward(computed, chunks, hidden_rows) if computed else None
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        keeping = [i for i, c in enumerate(chunks) if c.keeps_logits]
        wanted = [i for i in sampling + keeping if i in hidden_rows]
        logits_of: dict[int, torch.Tensor] = {}
        if wanted:
            assert hidden is not None
            rows = torch.tensor([hidden_rows[i] for i in wanted], device=self.device)
            logits = self.model.compute_logits(hidden[rows]).float()
            logits_of = {i: logits[j] for j, i in enumerate(wanted)}
        for i in keeping:
            state = chunks[i].seq.prefix_state
            assert state is not None
            state.logits = logits_of[i].clone()
        if not sampling:
            return []
        stacked = torch.stack([logits_of[i] if i in logits_of else self._kept_logits(chunks[i]) for i in sampling])
        return sample(stacked, self._sampling_tensors([chunks[i] for i in sampling])).tolist()

    @staticmethod
    def _kept_logits(chunk: ScheduledChunk) -> torch.Tensor:
        prefix = chunk.seq.start_prefix
        assert chunk.num_tokens == 0 and prefix is not None and prefix.logits is not None
        return prefix.logits

    def _forward(self, computed: list[ScheduledChunk], chunks: list[ScheduledChunk], hidden_rows: dict[int, int]) -> torch.Tensor:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        position_of = {id(c): i for i, c in enumerate(chunks)}
        for chunk in computed:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            hidden_rows[position_of[id(chunk)]] = len(input_ids) - 1
        device = self.device
        # decode rows that share leading blocks attend to them together (one pass per group)
        shared = [c.seq.shared_blocks if c.num_tokens == 1 else 0 for c in computed]
        meta = self.attention_backend.build_step_metadata(
            [c.num_tokens for c in computed],
            [c.start + c.num_tokens for c in computed],
            [c.seq.block_table for c in computed],
            bs,
            device,
            num_heads=self.model_cfg.num_heads,
            num_kv_heads=self.model_cfg.num_kv_heads,
            group_ids=[tuple(c.seq.block_table[:n]) if n else None for c, n in zip(computed, shared)],
            prefix_lens=[n * bs for n in shared],
        )
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        ctx = StepContext(self.attention_backend, self.kv_caches, slot_mapping, meta)
        return self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            ctx,
        )

    def _sampling_tensors(self, chunks: list[ScheduledChunk]) -> SamplingTensors:
        params = [c.seq.params for c in chunks]
        device = self.device
        return SamplingTensors(
            temperatures=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_ks=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            keys=torch.tensor([c.seq.sampling_key for c in chunks], dtype=torch.int64, device=device),
            steps=torch.tensor([c.seq.num_completion_tokens for c in chunks], dtype=torch.int64, device=device),
            all_greedy=all(p.greedy for p in params),
            any_top_k=any(p.top_k > 0 and not p.greedy for p in params),
            any_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
        )
