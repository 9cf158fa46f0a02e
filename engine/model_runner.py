"""Owns the model weights and the KV cache; turns scheduled chunks into one forward pass."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from engine.config import EngineConfig
from engine.decode_groups import choose_levels, nests, shared_levels
from engine.devices import check_device, cpu_has_native_bf16
from engine.errors import ConfigError
from engine.grammar_mask import TokenMask, apply_token_mask
from engine.host_memory import reuse_freed_memory
from engine.loader import load_model
from engine.memory_profile import CudaMemoryProfile, cpu_kv_budget, cuda_kv_budget, profile_step
from engine.model_config import ModelConfig
from engine.sampler import SamplingTensors, sample
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence
from engine.start_checks import (
    check_attention_backend,
    format_size,
    kv_block_bytes,
    kv_budget_blocks,
    kv_token_cap_blocks,
)
from engine.step_context import StepContext
from engine.thread_governor import ThreadGovernor
from engine.threads import apply_thread_count, thread_count_fixed
from kernels.attention_backend import select_backend
from kernels.cpu_library import LIBRARY_DTYPES, SWITCH_ENV, native_kernels_switch, native_library_problem
from kernels.cpu_linear import packed_linear_problem
from kernels.host_tensors import to_device

if TYPE_CHECKING:
    from engine.cuda_graphs import DecodeGraphs


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """The compute dtype of `--dtype` (see `auto_dtype` for "auto")."""
    if dtype == "auto":
        native_bf16 = device.type == "cpu" and cpu_has_native_bf16()
        return auto_dtype(device.type, checkpoint_dtype, native_bf16)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def auto_dtype(device_type: str, checkpoint_dtype: str | None, cpu_native_bf16: bool) -> torch.dtype:
    """bfloat16 on a GPU. On a CPU: bfloat16 for a half-precision checkpoint (bfloat16 or float16, as
    published models are) where the CPU multiplies bfloat16 in hardware, float32 otherwise (a float32
    checkpoint keeps its precision; emulated bfloat16 is slower than float32)."""
    if device_type != "cpu":
        return torch.bfloat16
    if cpu_native_bf16 and checkpoint_dtype in ("bfloat16", "float16"):
        return torch.bfloat16
    return torch.float32


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, max_model_len: int) -> None:
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.thread_governor: ThreadGovernor | None = None
        if self.device.type == "cpu":
            try:
                apply_thread_count()
                native_kernels_switch()
                if not thread_count_fixed():
                    # the count is the engine's own: one per CPU, fewer while other processes use some
                    self.thread_governor = ThreadGovernor.for_this_process()
                    if self.thread_governor is not None:
                        torch.set_num_threads(self.thread_governor.threads)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        check_attention_backend(cfg.attention_backend, self.device.type)  # before the weights load
        self.dtype = resolve_dtype(cfg.dtype, self.device, model_cfg.torch_dtype)
        self.block_size = cfg.block_size
        self.kv_element_size = self.dtype.itemsize
        self.max_model_len = max_model_len
        used_before = self._cuda_used_bytes()
        self.model = load_model(Path(cfg.model_dir), model_cfg, self.device, self.dtype, max_model_len)
        try:
            self.attention_backend = select_backend(cfg.attention_backend, self.device)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"--attention-backend {cfg.attention_backend}: {exc}") from exc
        # the Triton path also runs add+RMSNorm and RoPE as kernels (fewer passes over activations)
        self.model.use_fused_kernels(self.attention_backend.name == "triton")
        # counted before packing: a tied output projection's packed copy is no new parameter
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.linear_layers = self._pack_linears()
        # the compiled CPU library also runs the layers' elementwise steps (kernels/cpu_fused.py)
        self.model.use_cpu_fused_ops(self.decode_attention_path() == "compiled")
        # decode steps replay CUDA graphs where the backend can be captured; not with experts, whose
        # grouping sizes its buffers from the step's routing on the host, which a graph cannot replay
        self.use_graphs = (
            self.device.type == "cuda" and cfg.cuda_graphs and self.attention_backend.graph_variant() is not None
            and model_cfg.family.moe is None
        )
        self.num_blocks = self._num_kv_blocks(used_before)
        shape = (model_cfg.num_layers, 2, self.num_blocks, cfg.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        # Uninitialised on purpose: attention only ever reads slots that were written.
        self.kv_cache = self._allocate_kv_cache(shape)
        self.kv_caches = tuple((self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model_cfg.num_layers))
        if self.device.type == "cpu":
            reuse_freed_memory()  # after the weights and the KV cache: a step's activations are kept for the next
        self.decode_graphs: DecodeGraphs | None = None
        if self.use_graphs:
            self.decode_graphs = self.make_decode_graphs(capture=True)

    def decode_attention_path(self) -> str:
        """What computes decode attention: "compiled" (kernels/cpu_decode.py, built here at the first
        call), or the attention backend's name, with why the compiled kernel does not serve on a CPU."""
        name = self.attention_backend.name
        if self.device.type != "cpu" or name != "torch":
            return name
        if self.dtype not in LIBRARY_DTYPES:
            return f"torch ({str(self.dtype).removeprefix('torch.')} has no compiled CPU kernel)"
        problem = native_library_problem()
        return "compiled" if problem is None else f"torch ({problem})"

    def _pack_linears(self) -> str:
        """Packs the linear layers' weights for oneDNN on a CPU (kernels/cpu_linear.py); returns what runs
        them: "onednn-packed", else "torch", with why not on a CPU."""
        if self.device.type != "cpu":
            return "torch"
        if not native_kernels_switch():
            return f"torch (turned off by {SWITCH_ENV})"
        if self.dtype == torch.bfloat16 and not cpu_has_native_bf16():
            return "torch (bfloat16 is emulated on this CPU)"
        problem = packed_linear_problem(self.dtype)
        if problem is not None:
            return f"torch ({problem})"
        self.model.pack_linears()
        return "onednn-packed"

    def make_decode_graphs(self, capture: bool) -> DecodeGraphs:
        """capture=False: the graph path without the capture (static buffers run eagerly), for tests."""
        # Imported here: its decode plan imports Triton (~0.5 s), which a CPU run never uses.
        from engine.cuda_graphs import DecodeGraphs

        return DecodeGraphs(
            self.model, self.attention_backend, self.kv_caches, self.model_cfg,
            max_rows=self.cfg.max_num_seqs, max_model_len=self.max_model_len, block_size=self.block_size,
            device=self.device, capture=capture,
        )

    def _cuda_used_bytes(self) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _num_kv_blocks(self, used_before: int) -> int:
        cap = kv_token_cap_blocks(self.cfg)  # first: a cap of no block is refused whatever the memory
        block_bytes = kv_block_bytes(self.model_cfg, self.kv_element_size, self.block_size)
        budget = self.cfg.kv_cache_memory
        if budget is None:
            budget = self._cuda_kv_budget(used_before, block_bytes) if self.device.type == "cuda" else cpu_kv_budget()
        num_blocks = kv_budget_blocks(self.cfg, budget, block_bytes)
        return int(num_blocks if cap is None else min(num_blocks, cap))

    def _allocate_kv_cache(self, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        except RuntimeError as exc:
            # On CUDA an out-of-memory error goes on to the caller, which handles it (exit 75); in host
            # memory the budget asked for is more than the machine can give: a setting to change.
            if self.device.type != "cpu":
                raise
            size = self.num_blocks * kv_block_bytes(self.model_cfg, self.kv_element_size, self.block_size)
            # torch's text starts with the C++ assertion that failed: the allocator's own words follow
            reason = " ".join(str(exc).split()).split("DefaultCPUAllocator: ")[-1][:200]
            raise ConfigError(
                f"Cannot allocate a KV cache of {format_size(size)}: {reason}; lower --kv-cache-memory (or "
                "--kv-cache-tokens)."
            ) from exc

    def _cuda_kv_budget(self, used_before: int, block_bytes: int) -> int:
        weights = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        profile_step(
            self.model, self.attention_backend, self.model_cfg,
            num_tokens=self.cfg.max_batch_tokens, num_seqs=self.cfg.max_num_seqs,
            max_model_len=self.max_model_len, block_size=self.block_size, device=self.device, dtype=self.dtype,
        )
        torch.cuda.synchronize(self.device)
        profile = CudaMemoryProfile(
            total=torch.cuda.mem_get_info(self.device)[1],
            used_before=used_before,
            weights=weights,
            peak=torch.cuda.max_memory_allocated(self.device),
        )
        torch.cuda.empty_cache()
        budget = cuda_kv_budget(profile, self.cfg.gpu_memory_utilization, self.use_graphs)
        if budget < block_bytes:
            gib = 1 << 30
            raise ConfigError(
                f"No GPU memory is left for the KV cache: of {profile.total / gib:.1f} GiB x "
                f"--gpu-memory-utilization {self.cfg.gpu_memory_utilization}, {profile.used_before / gib:.1f} GiB was "
                f"in use before start, the weights take {profile.weights / gib:.1f} GiB and a step of "
                f"--max-batch-tokens {self.cfg.max_batch_tokens} peaks at {profile.activation_peak / gib:.1f} GiB more; "
                "raise --gpu-memory-utilization, lower --max-batch-tokens, or free the GPU."
            )
        return budget

    @torch.inference_mode()
    def run(
        self,
        chunks: list[ScheduledChunk],
        block_copies: list[tuple[int, int]] = (),
        token_mask: Callable[[], TokenMask | None] | None = None,
    ) -> list[int]:
        """One forward pass over the chunks; returns a new token for each chunk that samples.

        block_copies: (src, dst) KV blocks copied first (copy-on-write of shared partial blocks).
        A chunk completing a logits-keeping shared prefix leaves its last logits on the prefix;
        a zero-token chunk samples from its prefix's kept logits without a forward pass.
        token_mask: makes the grammar bitmask of the sampling chunks (structured output); called once the
        forward pass is queued, so on a GPU the host fills the mask while the device computes the logits.
        """
        if self.thread_governor is not None and (threads := self.thread_governor.tick()) is not None:
            torch.set_num_threads(threads)
        if block_copies:
            src = to_device([c[0] for c in block_copies], torch.int64, self.device)
            dst = to_device([c[1] for c in block_copies], torch.int64, self.device)
            # one gather, one scatter over the block dimension (index assignment: ~1.5x the time on a CPU)
            self.kv_cache.index_copy_(2, dst, self.kv_cache.index_select(2, src))
        if self._graphable(chunks):
            logits = self._decode_with_graph(chunks)
            return self._sample(logits, chunks, token_mask)
        computed: list[tuple[int, ScheduledChunk]] = []
        sampling: list[int] = []
        keeping: list[int] = []
        for i, c in enumerate(chunks):
            if c.num_tokens > 0:
                computed.append((i, c))
            if c.samples:
                sampling.append(i)
            elif c.keeps_logits:
                keeping.append(i)
        hidden_rows: dict[int, int] = {}  # chunk position in `chunks` -> row of its last token
        hidden = self._forward(computed, hidden_rows) if computed else None
        assert all(i in hidden_rows for i in keeping)  # a chunk keeping logits is a prefix's: it never samples
        sampled = [i for i in sampling if i in hidden_rows]  # the others sample from kept logits
        logits = None
        if sampled or keeping:
            assert hidden is not None
            rows = [hidden_rows[i] for i in sampled + keeping]
            if keeping or len(rows) < hidden.shape[0]:  # else every row, in order (rows ascend): a decode step
                hidden = hidden[to_device(rows, torch.int64, self.device)]
            logits = self.model.compute_logits(hidden).float()  # [sampled + keeping, vocab]
        for j, i in enumerate(keeping):
            state = chunks[i].seq.prefix_state
            assert state is not None and logits is not None
            state.logits = logits[len(sampled) + j].clone()
        if not sampling:
            return []
        if len(sampled) == len(sampling):
            assert logits is not None
            stacked = logits[: len(sampled)]
        else:
            logits_of = {i: logits[j] for j, i in enumerate(sampled)} if logits is not None else {}
            stacked = torch.stack([logits_of[i] if i in logits_of else self._kept_logits(chunks[i]) for i in sampling])
        return self._sample(stacked, [chunks[i] for i in sampling], token_mask)

    def _sample(
        self, logits: torch.Tensor, chunks: list[ScheduledChunk], token_mask: Callable[[], TokenMask | None] | None
    ) -> list[int]:
        mask = token_mask() if token_mask is not None else None
        if mask is not None:
            apply_token_mask(logits, mask)
        return sample(logits, self._sampling_tensors(chunks)).tolist()

    def _graphable(self, chunks: list[ScheduledChunk]) -> bool:
        return (
            self.decode_graphs is not None
            and 0 < len(chunks) <= self.decode_graphs.max_rows
            and all(c.num_tokens == 1 and c.samples and not c.keeps_logits for c in chunks)
        )

    def _decode_with_graph(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        assert self.decode_graphs is not None
        bs = self.block_size
        positions = [c.start for c in chunks]
        tables = [c.seq.block_table for c in chunks]
        return self.decode_graphs.run(
            [c.seq.token_ids[c.start] for c in chunks],
            positions,
            [_slot(t, p, bs) for t, p in zip(tables, positions)],
            tables,
            [_group_key(c.seq) for c in chunks],
            [c.seq.shared_blocks * bs for c in chunks],
        )

    @staticmethod
    def _kept_logits(chunk: ScheduledChunk) -> torch.Tensor:
        prefix = chunk.seq.start_prefix
        assert chunk.num_tokens == 0 and prefix is not None and prefix.logits is not None
        return prefix.logits

    def _forward(self, indexed: list[tuple[int, ScheduledChunk]], hidden_rows: dict[int, int]) -> torch.Tensor:
        """Forward of the (index in the step, chunk) pairs; hidden_rows[index] = row of its last token."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        # per chunk, what the attention metadata needs
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        group_ids: list[tuple[int, int] | None] = []
        prefix_lens: list[int] = []
        nested: list[int] = []  # decode chunks whose rows share prefixes at several depths (plan mode)
        for index, chunk in indexed:
            seq, start, num = chunk.seq, chunk.start, chunk.num_tokens
            end = start + num
            table = seq.block_table
            if num == 1:  # a decode: most chunks of most steps
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(_slot(table, start, bs))
                if nests(seq):
                    nested.append(len(tables))
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                for b in range(start // bs, (end - 1) // bs + 1):  # the chunk's positions block by block
                    first = table[b] * bs
                    slots.extend(range(first + max(start - b * bs, 0), first + min(end - b * bs, bs)))
            hidden_rows[index] = len(input_ids) - 1
            query_lens.append(num)
            context_lens.append(end)
            tables.append(table)
            group_ids.append(_group_key(seq))
            prefix_lens.append(seq.shared_blocks * bs)
        if nested:  # decode rows attend with the depth of prefix that reads the least (engine/decode_groups.py)
            self._regroup(nested, indexed, tables, group_ids, prefix_lens)
        device = self.device
        # chunks whose rows share leading blocks may attend to them together (one pass per group):
        # decode rows always, short prefill chunks where the backend finds it pays
        meta = self.attention_backend.build_step_metadata(
            query_lens,
            context_lens,
            tables,
            bs,
            device,
            num_heads=self.model_cfg.num_heads,
            num_kv_heads=self.model_cfg.num_kv_heads,
            group_ids=group_ids,
            prefix_lens=prefix_lens,
            window=self.model_cfg.attention_reach,
        )
        slot_mapping = to_device(slots, torch.int64, device)
        ctx = StepContext(self.attention_backend, self.kv_caches, slot_mapping, meta)
        return self.model(to_device(input_ids, torch.int64, device), to_device(positions, torch.int64, device), ctx)

    def _regroup(self, nested: list[int], indexed: list[tuple[int, ScheduledChunk]], tables: list[list[int]],
                 group_ids: list[tuple[int, int] | None], prefix_lens: list[int]) -> None:
        """Sets the group of each decode chunk at `nested` (its position in the step's lists) to the depth
        of shared prefix choose_levels picks; the rows of one deepest prefix share their levels."""
        kinds: dict[tuple[int, int] | None, list[int]] = {}
        for i in nested:
            kinds.setdefault(group_ids[i], []).append(i)
        firsts = [positions[0] for positions in kinds.values()]
        chosen = choose_levels([shared_levels(indexed[i][1].seq) for i in firsts], [tables[i] for i in firsts],
                               [len(positions) for positions in kinds.values()],
                               self.model_cfg.num_heads // self.model_cfg.num_kv_heads)
        for positions, n in zip(kinds.values(), chosen):
            for i in positions:
                group_ids[i] = (n, tables[i][n - 1]) if n else None
                prefix_lens[i] = n * self.block_size

    def _sampling_tensors(self, chunks: list[ScheduledChunk]) -> SamplingTensors:
        params = [c.seq.params for c in chunks]
        device = self.device
        if all(p.greedy for p in params):  # argmax only: no per-row tensors to ship
            empty = torch.empty(0, device=device)
            return SamplingTensors(empty, empty, empty, empty, empty, all_greedy=True, any_top_k=False, any_top_p=False)
        return SamplingTensors(
            temperatures=to_device([0.0 if p.greedy else p.temperature for p in params], torch.float32, device),
            top_ks=to_device([p.top_k for p in params], torch.int64, device),
            top_ps=to_device([p.top_p for p in params], torch.float32, device),
            keys=to_device([c.seq.sampling_key for c in chunks], torch.int64, device),
            steps=to_device([c.seq.num_completion_tokens for c in chunks], torch.int64, device),
            all_greedy=False,
            any_top_k=any(p.top_k > 0 and not p.greedy for p in params),
            any_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
        )


def _slot(table: list[int], position: int, block_size: int) -> int:
    """The KV cache slot of a token position through its row's block table."""
    return table[position // block_size] * block_size + position % block_size


def _group_key(seq: Sequence) -> tuple[int, int] | None:
    """Which group a row's shared leading blocks make it part of: (number of blocks, the last one).
    Rows holding the same physical block at the same index share every block before it (a plan
    member starts on its prefix's blocks; an lru hit chain maps each prefix to one block), and
    build_shared_prefix_batch checks the ends of the shared run."""
    n = seq.shared_blocks
    return (n, seq.block_table[n - 1]) if n else None
