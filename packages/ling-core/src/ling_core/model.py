"""The Ling (HF `bailing_moe`) decoder: architecture only.

Parallelism, precision policy and training live outside (torchtitan's rule). The model builds on
any device, including `meta`; `init_weights()` is separate from construction so a large model can
be built on meta, sharded, materialised with `to_empty()`, then initialised. Built on a real
device, it is initialised at once, as `build_model(config, seed=0)` would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ling_kernels import apply_rope, fused_linear_cross_entropy

from ling_core.config import LingConfig
from ling_core.layers import Embedding, Linear, RMSNorm, SwiGLU
from ling_core.moe import MoE, Router

IGNORE_INDEX = -100


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim] for the rotate-half RoPE layout HF uses."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Grouped-query causal attention with a fused q,k,v projection (HF `query_key_value`)."""

    def __init__(self, config: LingConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = Linear(config.hidden_size, qkv_out, bias=config.use_qkv_bias)
        self.dense = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [batch, heads, seq, dim], k and v [batch, kv_heads, seq, dim], before RoPE (the
        KV-cache forward used for evaluation shares this projection)."""
        batch, seq, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.query_key_value(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """SDPA's [batch, heads, seq, dim] output through the output projection."""
        batch, _, seq, _ = out.shape
        return self.dense(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask`: bool [batch, 1, seq, seq], True where a query may attend (see
        `packed_causal_mask`); None is plain causal attention."""
        q, k, v = self.heads(x)
        cos, sin = rope_cos_sin(x.shape[1], self.head_dim, self.rope_theta, x.device)
        q, k = apply_rope(q, k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.merge_heads(out)


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention that stays inside each packed sample: bool [batch, 1, seq, seq].

    `segment_ids` [batch, seq] numbers the samples of a row (padding is a segment of its own).
    Positions keep counting across a row; RoPE scores depend only on the distance between two
    positions, so a sample attends exactly as it would alone, up to the rounding of its angles."""
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    return (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


class DecoderLayer(nn.Module):
    def __init__(self, config: LingConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = (MoE(config) if self.is_moe
                    else SwiGLU(config.hidden_size, config.intermediate_size, config.use_bias))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = x + self.attention(self.input_layernorm(x), attention_mask)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, routing = self.mlp(h)
            return x + out, routing
        return x + self.mlp(h), None


class LingModel(nn.Module):
    def __init__(self, config: LingConfig):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class LingOutput:
    logits: torch.Tensor | None  # [batch, seq, vocab]; None when labels were given (see forward)
    loss: torch.Tensor | None  # lm_loss + weighted auxiliaries (the training objective)
    lm_loss: torch.Tensor | None  # mean cross-entropy over non-ignored labels
    balance_loss: torch.Tensor  # mean over MoE layers (0 without MoE layers)
    router_z_loss: torch.Tensor  # mean over MoE layers
    tokens_per_expert: torch.Tensor  # [num_moe_layers, num_experts] int64


class LingForCausalLM(nn.Module):
    """Ling MoE causal LM. `forward(input_ids, labels)` takes labels already aligned with the
    inputs (labels[:, t] is the target of position t; -100 is ignored), as a packed loader makes
    them, and returns logits, the loss and the MoE auxiliaries."""

    def __init__(self, config: LingConfig):
        super().__init__()
        self.config = config
        self.model = LingModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.lm_head.weight.device.type != "meta":
            # Built for use rather than on meta to be materialised later: init as build_model(seed=0)
            # does, so a model is never uninitialised memory (which gave NaN or garbage losses).
            self.init_weights()

    # --- weights ---
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms; the output
        projections (attention dense, down_proj) are scaled by 1/sqrt(2 * layers) so the residual
        stream's variance stays independent of depth."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0 if seed is None else seed)
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
                continue
            s = out_std if name.endswith(("dense.weight", "down_proj.weight")) else std
            # Draw on CPU from one generator so init is identical on every device.
            param.copy_(torch.randn(param.shape, generator=generator) * s)

    def set_step(self, step: int) -> None:
        """Tell step-dependent layers (Stochastic Routing Warmup) the current training step."""
        for module in self.modules():
            if isinstance(module, Router):
                module.step = step

    # --- forward ---
    def output_weight(self) -> torch.Tensor:
        """NormHead, as the Ling reference (HF `bailing_moe`) computes it: each hidden column of the
        [vocab, hidden] lm_head is divided by its L2 norm over the vocabulary (dim 0), plus 1e-7.
        The norm is detached, so the gradient is the plain one scaled by 1 / norm: the normaliser
        keeps the logits' scale fixed without pulling the weights towards or away from it."""
        weight = self.lm_head.weight
        if self.config.norm_head:
            return weight / (torch.linalg.vector_norm(weight, dim=0, keepdim=True) + 1e-7).detach()
        return weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                return_logits: bool = False, segment_ids: torch.Tensor | None = None) -> LingOutput:
        """With `labels`, the loss comes from ling-kernels' chunked linear cross-entropy, which
        never materialises the [tokens, vocab] logits; they are returned only without labels or
        when `return_logits` asks for them. `segment_ids` [batch, seq]: rows packed with several
        samples (`ling_data.sft`), each attending only within itself (`packed_causal_mask`)."""
        x = self.model.word_embeddings(input_ids)
        attention_mask = None if segment_ids is None else packed_causal_mask(segment_ids)
        routings = []
        for layer in self.model.layers:
            x, routing = layer(x, attention_mask)
            if routing is not None:
                routings.append(routing)
        x = self.model.norm(x)
        weight = self.output_weight()
        logits = F.linear(x, weight) if labels is None or return_logits else None

        zero = x.new_zeros((), dtype=torch.float32)
        balance = torch.stack([r.balance_loss for r in routings]).mean() if routings else zero
        z_loss = torch.stack([r.router_z_loss for r in routings]).mean() if routings else zero
        tokens_per_expert = (torch.stack([r.tokens_per_expert for r in routings]) if routings
                             else torch.zeros(0, self.config.num_experts, dtype=torch.long))
        loss = lm_loss = None
        if labels is not None:
            if segment_ids is not None:
                # Packed SFT rows carry loss on the assistant's tokens only (15% of the KG rows at
                # seq_len 2048); the head's matmuls need not run on the masked rest.
                keep = labels != IGNORE_INDEX
                x, labels = x[keep], labels[keep]
            lm_loss = self.lm_loss(x, weight, labels)
            loss = (lm_loss + self.config.balance_loss_weight * balance
                    + self.config.router_z_loss_weight * z_loss)
        return LingOutput(logits, loss, lm_loss, balance, z_loss, tokens_per_expert)

    @staticmethod
    def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The kernel is an autograd.Function; run it outside autocast with the dtype autocast
        # would have used for the matmul, so its hand-written backward sees consistent dtypes.
        device_type = hidden.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else hidden.dtype)
        with torch.autocast(device_type, enabled=False):
            loss, _ = fused_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels,
                                                 ignore_index=IGNORE_INDEX)
        return loss

    # --- HF IO (see ling_core.hf_io) ---
    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        from ling_core.hf_io import save_pretrained
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        save_pretrained(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu") -> "LingForCausalLM":
        from ling_core.hf_io import from_pretrained
        return from_pretrained(path, device=device)


def build_model(config: LingConfig, device: str | torch.device = "cpu", seed: int = 0) -> LingForCausalLM:
    """Construct on meta, materialise on `device`, initialise from `seed`."""
    with torch.device("meta"):
        model = LingForCausalLM(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
