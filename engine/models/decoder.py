"""One decoder-only transformer covering the Llama, Mistral (sliding-window attention), Qwen2 (q/k/v
bias), Qwen3 (per-head q/k RMSNorm), Phi-3 (partial rotary, LongRoPE, sliding window), Granite
(multipliers), OLMo 2 (post-norm layer, q/k RMSNorm over the whole projection), Gemma 2 / 3 (norms
around attention and the MLP, soft-capping, gelu-tanh, per-layer windows and RoPE), Qwen3-MoE and
Mixtral (mixture-of-experts MLP, engine/models/moe.py) families; where they differ is named in
`ModelConfig.family` (and `ModelConfig.layer_window`, `ModelConfig.layer_has_experts`). Projections are fused (qkv,
gate+up) so each layer runs few large matmuls; the loader splits Hugging Face weights into them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_config import ModelConfig
from engine.models.moe import SparseMoeBlock
from engine.models.packed_linear import PackedLinear, pack_linears
from engine.models.rope import apply_rope, apply_rope_fast, rope_cache
from engine.step_context import StepContext
from kernels import triton_interpreting
from kernels.cpu_fused import fused_ops_usable, native_rms_norm, native_rope, native_silu_mul


class RMSNorm(nn.Module):
    """norm(x), or with a residual: (norm(residual + x), residual + x) as one fused op when `fused`.
    unit_offset (Gemma): the weight is an offset from one, x * (1 + weight) multiplied in float32."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.fused = False  # Triton kernel (kernels.rms_norm) instead of the PyTorch ops; never with unit_offset
        self.cpu_fused = False  # compiled CPU kernel (kernels.cpu_fused) instead; never with unit_offset

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            from kernels import rms_norm as kernel  # lazy: Triton only once fused kernels are enabled

            if residual is None:
                return kernel.rms_norm(x, self.weight, self.eps)
            return kernel.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if self.cpu_fused and fused_ops_usable(x):
            if x.dim() == 2:  # [tokens, dim]: the layer norms
                normed, summed = native_rms_norm(x, self.weight, self.eps, residual)
                return normed if summed is None else (normed, summed)
            # x: [..., dim] (q/k norms: [tokens, heads, head_dim]) as rows of dim
            normed, summed = native_rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps,
                                             None if residual is None else residual.reshape(-1, x.shape[-1]))
            if summed is None:
                return normed.view(x.shape)
            return normed.view(x.shape), summed.view(x.shape)
        if residual is not None:
            residual = residual + x
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics whatever the model dtype, as the reference implementation does
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)


@dataclass(frozen=True)
class RotaryInputs:
    """One step's rotary inputs, shared by every layer."""

    positions: torch.Tensor  # [num_tokens] int64
    table: torch.Tensor  # [max_positions, 2, rotary_dim] float32 cos/sin (the fused kernels read it)
    dtype: torch.dtype  # the model's
    local: RotaryInputs | None = None  # the sliding layers' own RoPE (Gemma 3); None: this one
    _gathered: dict = field(default_factory=dict, compare=False, repr=False)

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at the step's positions, [num_tokens, 1, rotary_dim] in the model dtype: gathered at
        the first layer that asks (the PyTorch RoPE), none when the fused kernels read the table."""
        found = self._gathered.get("cos_sin")
        if found is None:
            cos_sin = self.table[self.positions].to(self.dtype)  # [num_tokens, 2, rotary_dim]
            found = self._gathered["cos_sin"] = (cos_sin[:, 0:1], cos_sin[:, 1:2])
        return found


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        scale = cfg.family.attention_scale
        self.scale = cfg.head_dim**-0.5 if scale is None else scale
        self.window = cfg.layer_window(layer_index)  # None: full causal attention
        self.local_rope = cfg.layer_rope(layer_index) is not cfg.rope  # reads RotaryInputs.local
        self.softcap = cfg.family.attention_softcap
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        # q/k RMSNorm per head (weights [head_dim]) or over the whole projection ([q_size], [kv_size])
        self.qk_norm = cfg.family.qk_norm
        whole = self.qk_norm == "whole"
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if self.qk_norm != "none":
            offset = cfg.family.gemma_norms
            self.q_norm = RMSNorm(self.q_size if whole else cfg.head_dim, cfg.rms_norm_eps, offset)
            self.k_norm = RMSNorm(self.kv_size if whole else cfg.head_dim, cfg.rms_norm_eps, offset)
        self.fused = False  # RoPE by the Triton kernel (kernels.rotary), in place
        self.cpu_fused = False  # RoPE by the compiled CPU kernel (kernels.cpu_fused)

    def forward(self, x: torch.Tensor, rope: RotaryInputs, ctx: StepContext) -> torch.Tensor:
        # x: [num_tokens, hidden]
        if self.local_rope:
            assert rope.local is not None
            rope = rope.local
        qkv = self.qkv_proj(x)
        if self._joint_rope(qkv):
            return self._forward_joint_rope(qkv, rope, ctx)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "whole":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            from kernels.rotary import rotary_embedding  # lazy: Triton only once fused kernels are enabled

            # in place (qkv or the q/k norm output); views of the rotated dims under partial rotary
            d = self.rotary_dim
            rotary_embedding(q[..., :d], k[..., :d], rope.positions, rope.table)
        elif self.cpu_fused and fused_ops_usable(q):
            q, k = native_rope(q, rope.positions, rope.table), native_rope(k, rope.positions, rope.table)
        else:
            cos, sin = rope.cos_sin()
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = ctx.attention(self.layer_index, q, k, v.contiguous(), self.scale, self.window, self.softcap)
        return self.o_proj(out.reshape(-1, self.q_size))

    def _joint_rope(self, qkv: torch.Tensor) -> bool:
        # float32 only: in 16-bit types apply_rope rounds each product as transformers does
        return (not self.fused and self.qk_norm == "none" and self.rotary_dim == self.head_dim
                and qkv.dtype == torch.float32)

    def _forward_joint_rope(self, qkv: torch.Tensor, rope: RotaryInputs, ctx: StepContext) -> torch.Tensor:
        # q and k lie side by side in qkv: one rotation over both ([num_tokens, heads + kv_heads, head_dim])
        heads = self.num_heads + self.num_kv_heads
        qk_in = qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim)
        if self.cpu_fused and fused_ops_usable(qkv):
            qk = native_rope(qk_in, rope.positions, rope.table)
        else:
            qk = apply_rope_fast(qk_in, *rope.cos_sin())
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        # a view, no copy: the KV store and attention read strided rows
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        out = ctx.attention(self.layer_index, q, k, v, self.scale, self.window, self.softcap)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gelu_tanh = cfg.family.mlp_activation == "gelu_tanh"
        self.cpu_fused = False  # SiLU(gate) * up by the compiled CPU kernel (kernels.cpu_fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.cpu_fused and not self.gelu_tanh and fused_ops_usable(gate_up):
            return self.down_proj(native_silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu_tanh else F.silu(gate)
        return self.down_proj(act * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.post_norm = cfg.family.post_norm
        self.gemma = cfg.family.gemma_norms
        self.residual_multiplier = cfg.family.residual_multiplier
        # the pre-norm layer norms before attention (input_) and before the MLP (post_attention_);
        # the post-norm layer (OLMo 2) norms the attention (post_attention_) and MLP (post_feedforward_) outputs;
        # Gemma's layer does both: input_ and pre_feedforward_ before, post_attention_ and post_feedforward_ after
        hidden, eps, offset = cfg.hidden_size, cfg.rms_norm_eps, self.gemma
        self.input_layernorm = None if self.post_norm else RMSNorm(hidden, eps, offset)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset) if self.gemma else None
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset) if self.post_norm or self.gemma else None
        self.mlp = SparseMoeBlock(cfg) if cfg.layer_has_experts(layer_index) else MLP(cfg)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [num_tokens, hidden], the previous layer's MLP output (or the embeddings, residual None);
        # the residual stream is carried separately (the hidden state is residual + x) so each norm
        # can fuse the add before it
        if self.post_norm:
            return self._post_norm_forward(x, residual, rope, ctx)
        if self.gemma:
            return self._gemma_forward(x, residual, rope, ctx)
        assert self.input_layernorm is not None
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self._scaled(self.self_attn(x, rope, ctx))
        x, residual = self.post_attention_layernorm(x, residual)
        return self._scaled(self.mlp(x)), residual

    def _post_norm_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.post_feedforward_layernorm is not None
        hidden = x if residual is None else residual + x
        hidden = hidden + self.post_attention_layernorm(self.self_attn(hidden, rope, ctx))
        return self.post_feedforward_layernorm(self.mlp(hidden)), hidden

    def _gemma_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.input_layernorm is not None and self.pre_feedforward_layernorm is not None
        assert self.post_feedforward_layernorm is not None
        hidden = x if residual is None else residual + x
        hidden = hidden + self.post_attention_layernorm(self.self_attn(self.input_layernorm(hidden), rope, ctx))
        return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden))), hidden

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        # Granite's residual_multiplier scales each branch before the residual add
        return x if self.residual_multiplier == 1.0 else x * self.residual_multiplier


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.gemma_norms)


class DecoderForCausalLM(nn.Module):
    """Parameter names follow Hugging Face (`model.layers.N....`, `lm_head`) except the fused ones."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope", torch.empty(0), persistent=False)
        self.register_buffer("local_rope", torch.empty(0), persistent=False)  # Gemma 3's sliding layers'
        self.fused_kernels = False

    def init_rope(self, max_positions: int) -> None:
        """Fills the [max_positions, 2, head_dim] cos/sin tables (float32, on the model's device)."""
        device = self.model.embed_tokens.weight.device
        self.rope = rope_cache(self.config.rope, self.config.rotary_dim, max_positions).to(device)
        if self.config.local_rope is not None:
            self.local_rope = rope_cache(self.config.local_rope, self.config.rotary_dim, max_positions).to(device)

    def use_fused_kernels(self, enabled: bool) -> None:
        """Run add+RMSNorm, RoPE and the mixture of experts as Triton kernels (kernels.rms_norm,
        kernels.rotary, kernels.fused_moe) instead of PyTorch ops (Gemma's (1 + weight) norms stay PyTorch
        ops); off by default. Outputs match the PyTorch path up to float rounding. RoPE then
        rotates q/k in place in the qkv buffer, unseen by autograd: for inference only."""
        device = self.model.embed_tokens.weight.device
        if enabled and device.type != "cuda" and not triton_interpreting():
            raise ValueError(f"The fused kernels need a CUDA device (the model is on {device.type}), "
                             "or TRITON_INTERPRET=1 to run them in Triton's CPU interpreter.")
        if enabled:
            import kernels.rms_norm  # noqa: F401 - a missing or broken Triton fails here, not mid-forward
            import kernels.rotary  # noqa: F401
            if self.config.family.moe is not None:
                import kernels.fused_moe  # noqa: F401
        self.fused_kernels = enabled
        for module in self.modules():
            if isinstance(module, (Attention, SparseMoeBlock)) or (isinstance(module, RMSNorm) and not module.unit_offset):
                module.fused = enabled

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]
        x = self.model.embed_tokens(input_ids)
        family = self.config.family
        if family.embedding_scale_in_model_dtype:  # Gemma: the multiplier rounded to the model dtype first
            x = x * torch.tensor(family.embedding_multiplier, dtype=x.dtype)
        elif family.embedding_multiplier != 1.0:
            x = x * family.embedding_multiplier
        local = None if self.config.local_rope is None else RotaryInputs(positions, self.local_rope, x.dtype)
        rope = RotaryInputs(positions, self.rope, x.dtype, local)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, ctx)
        if residual is None:  # a model without layers
            return self.model.norm(x)
        return self.model.norm(x, residual)[0]

    def use_cpu_fused_ops(self, enabled: bool) -> None:
        """Run add+RMSNorm, SiLU(gate) * up and RoPE as compiled CPU kernels (kernels.cpu_fused;
        the caller checks the library is there); Gemma's (1 + weight) norms and gelu stay PyTorch ops.
        Outputs match the PyTorch ops up to the order of float32 sums."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)) or (isinstance(module, RMSNorm) and not module.unit_offset):
                module.cpu_fused = enabled

    def pack_linears(self) -> None:
        """Runs every linear layer through oneDNN with packed weights (engine/models/packed_linear.py;
        the caller checks kernels.cpu_linear.packed_linear_problem first). CPU, inference only. A tied
        output projection gets its own packed copy of the embeddings (vocab x hidden more memory):
        the embedding lookup still needs the dense table."""
        pack_linears(self)
        if self.lm_head is None:
            self.lm_head = PackedLinear(self.model.embed_tokens.weight, None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)
        scaling = self.config.family.logits_scaling
        if scaling != 1.0:
            logits = logits / scaling
        cap = self.config.family.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
