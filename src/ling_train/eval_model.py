"""Ling models as ling-eval sees them: a forward, a KV-cache `extend`, and the checkpoint loader
registered under the `ling_eval.model_loaders` entry point for `model_type = "bailing_moe"`.

The cached forward lives here, not in ling-core, because only evaluation needs it: it reuses
the model's own modules (norms, fused qkv, RoPE tables, MoE layers) and differs from
`LingForCausalLM.forward` only in attending to cached keys/values at shifted positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ling_core import CheckpointError, LingForCausalLM, from_pretrained
from ling_core.model import Attention, apply_rope, rope_cos_sin
from ling_eval import CheckpointLoadError, EvalModel

TOKENIZER_FILE = "tokenizer.model"

# cache: one (keys, values) pair per layer, each [batch, kv_heads, positions, head_dim]
Cache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def _attention(attn: Attention, x: torch.Tensor, layer_cache, past: int):
    batch, seq, _ = x.shape
    q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    q, k, v = attn.query_key_value(x).split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(batch, seq, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = k.view(batch, seq, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = v.view(batch, seq, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = rope_cos_sin(past + seq, attn.head_dim, attn.rope_theta, x.device)
    cos, sin = cos[past:], sin[past:]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if layer_cache is not None:
        k = torch.cat([layer_cache[0], k], dim=2)
        v = torch.cat([layer_cache[1], v], dim=2)
    gqa = attn.num_kv_heads != attn.num_heads
    if past == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:  # query i (at position past + i) sees keys 0 .. past + i
        positions = torch.arange(past + seq, device=x.device)
        mask = positions[None, :] <= (past + torch.arange(seq, device=x.device))[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return attn.dense(out.transpose(1, 2).reshape(batch, seq, q_size)), (k, v)


@torch.no_grad()
def extend(model: LingForCausalLM, input_ids: torch.Tensor, cache: Cache | None = None
           ) -> tuple[torch.Tensor, Cache]:
    """Logits of `input_ids` placed after the positions held in `cache`, and the grown cache."""
    past = 0 if cache is None else cache[0][0].shape[2]
    x = model.model.word_embeddings(input_ids)
    new_cache = []
    for i, layer in enumerate(model.model.layers):
        out, kv = _attention(layer.attention, layer.input_layernorm(x), None if cache is None else cache[i], past)
        x = x + out
        h = layer.post_attention_layernorm(x)
        x = x + (layer.mlp(h)[0] if layer.is_moe else layer.mlp(h))
        new_cache.append(kv)
    logits = F.linear(model.model.norm(x), model.output_weight())
    return logits, tuple(new_cache)


def ling_eval_model(model: LingForCausalLM, max_length: int | None = None) -> EvalModel:
    """Wrap a LingForCausalLM (put in eval mode) for ling-eval."""
    model.eval()
    device = next(model.parameters()).device

    @torch.no_grad()
    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids).logits

    return EvalModel(forward, lambda ids, cache: extend(model, ids, cache),
                     max_length=max_length or model.config.max_position_embeddings, device=device)


def find_tokenizer(checkpoint: Path) -> Path:
    """`tokenizer.model` in the checkpoint, else in its run directory (RUN/checkpoints/step-N)."""
    for candidate in (checkpoint / TOKENIZER_FILE, checkpoint.parent.parent / TOKENIZER_FILE):
        if candidate.is_file():
            return candidate
    raise CheckpointLoadError(f"{checkpoint}: no {TOKENIZER_FILE} (looked in the checkpoint and in its run "
                              f"directory {checkpoint.parent.parent})")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """ling-eval loader for `bailing_moe` checkpoints: (EvalModel, tokenizer)."""
    from ling_data import DataError, Tokenizer

    path = Path(path)
    try:
        model = from_pretrained(path, device=device)
    except CheckpointError as e:
        raise CheckpointLoadError(str(e)) from None
    try:
        tokenizer = Tokenizer.load(find_tokenizer(path))
    except (DataError, OSError, RuntimeError) as e:
        raise CheckpointLoadError(f"{path}: cannot load the tokenizer ({e})") from None
    return ling_eval_model(model), tokenizer
