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

from ling_core import CheckpointError, LingConfig, LingForCausalLM, from_pretrained
from ling_core.model import Attention, rope_cos_sin
from ling_eval import CheckpointLoadError, EvalModel
from ling_kernels import apply_rope
from ling_kernels.rope import reference as apply_rope_per_row  # broadcasts [batch, 1, seq, dim] tables

TOKENIZER_FILE = "tokenizer.model"

# cache: one (keys, values) pair per layer, each [batch, kv_heads, positions, head_dim]
Cache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def _attention(attn: Attention, x: torch.Tensor, layer_cache, past: int, positions, mask):
    """positions: None (0.. in order) or [batch, seq] RoPE positions; mask: None (causal) or
    [batch, 1, seq, past + seq] bool, True = may attend."""
    seq = x.shape[1]
    q, k, v = attn.heads(x)
    if positions is None:
        cos, sin = rope_cos_sin(past + seq, attn.head_dim, attn.rope_theta, x.device)
        q, k = apply_rope(q, k, cos[past:], sin[past:])
    else:
        cos, sin = rope_cos_sin(int(positions.max()) + 1, attn.head_dim, attn.rope_theta, x.device)
        q, k = apply_rope_per_row(q, k, cos[positions][:, None], sin[positions][:, None])
    if layer_cache is not None:
        k = torch.cat([layer_cache[0], k], dim=2)
        v = torch.cat([layer_cache[1], v], dim=2)
    gqa = attn.num_kv_heads != attn.num_heads
    if mask is None and past == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        if mask is None:  # query i (at position past + i) sees keys 0 .. past + i
            slots = torch.arange(past + seq, device=x.device)
            mask = slots[None, :] <= slots[past:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return attn.merge_heads(out), (k, v)


def _positions_and_mask(attention_mask: torch.Tensor, past: int, seq: int):
    """RoPE positions (real tokens counted from the mask) and the [batch, 1, seq, past + seq]
    attention mask: causal, padded keys masked; a padding query attends to itself only (its
    output is never read, but a row of all-False would make SDPA return NaN)."""
    attention_mask = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
    slots = torch.arange(past + seq, device=attention_mask.device)
    causal = slots[None, :] <= slots[past:, None]
    mask = (causal[None] & attention_mask[:, None, :]) | (slots[None, :] == slots[past:, None])[None]
    return positions, mask[:, None]


@torch.no_grad()
def extend(model: LingForCausalLM, input_ids: torch.Tensor, cache: Cache | None = None,
           attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Cache]:
    """Logits of `input_ids` placed after the positions held in `cache`, and the grown cache.
    `attention_mask` [batch, cached + new], 0 = padding (see ling_eval.model)."""
    past = 0 if cache is None else cache[0][0].shape[2]
    positions = mask = None
    if attention_mask is not None:
        positions, mask = _positions_and_mask(attention_mask, past, input_ids.shape[1])
    x = model.model.word_embeddings(input_ids)
    new_cache = []
    for i, layer in enumerate(model.model.layers):
        out, kv = _attention(layer.attention, layer.input_layernorm(x), None if cache is None else cache[i], past,
                             positions, mask)
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

    return EvalModel(forward, lambda ids, cache, attention_mask=None: extend(model, ids, cache, attention_mask),
                     max_length=max_length or model.config.max_position_embeddings, device=device)


def model_from_state(config: LingConfig, state: dict[str, torch.Tensor], device: str | torch.device) -> LingForCausalLM:
    """A plain LingForCausalLM holding `state`'s tensors, moved to `device` (shared, not copied,
    when already there): in-training eval scores this instead of the trained module, whose hooks
    (FSDP2's all-gathers, EDiT's sync pre-hooks) must not run in an eval forward."""
    with torch.device("meta"):
        model = LingForCausalLM(config)
    model.load_state_dict({name: tensor.to(device) for name, tensor in state.items()}, assign=True)
    return model


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
