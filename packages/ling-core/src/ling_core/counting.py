"""Exact parameter counts and training FLOPs per token, from the config alone (no allocation)."""

from __future__ import annotations

from ling_core.config import LingConfig


def _swiglu_params(hidden: int, intermediate: int, bias: bool) -> int:
    return 3 * hidden * intermediate + (2 * intermediate + hidden if bias else 0)


def _attention_params(c: LingConfig) -> int:
    qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    q_size = c.num_attention_heads * c.head_dim
    return (c.hidden_size * qkv_out + (qkv_out if c.use_qkv_bias else 0)
            + q_size * c.hidden_size + (c.hidden_size if c.use_bias else 0))


def expert_params(c: LingConfig) -> int:
    """Parameters of one routed expert."""
    return _swiglu_params(c.hidden_size, c.moe_intermediate_size, c.use_bias)


def count_params(c: LingConfig) -> tuple[int, int]:
    """(total, active) parameters, equal to the built model's count. Active counts what one
    token touches: everything except the routed experts it was not sent to (embeddings and the
    output head included, as the Ling report counts)."""
    norms = 2 * c.hidden_size
    per_layer_common = _attention_params(c) + norms
    dense_mlp = _swiglu_params(c.hidden_size, c.intermediate_size, c.use_bias)
    shared = (_swiglu_params(c.hidden_size, c.moe_intermediate_size * c.num_shared_experts, c.use_bias)
              if c.num_shared_experts > 0 else 0)
    router = c.num_experts * c.hidden_size
    moe_total = router + shared + c.num_experts * expert_params(c)
    moe_active = router + shared + c.num_experts_per_tok * expert_params(c)
    embed_and_head = 2 * c.vocab_size * c.hidden_size + c.hidden_size  # + final norm
    n_dense, n_moe = c.first_k_dense_replace, c.num_moe_layers
    total = embed_and_head + c.num_hidden_layers * per_layer_common + n_dense * dense_mlp + n_moe * moe_total
    active = embed_and_head + c.num_hidden_layers * per_layer_common + n_dense * dense_mlp + n_moe * moe_active
    return total, active


def matmul_params_per_token(c: LingConfig) -> int:
    """Weights that take part in a matmul for one token: active params minus the embedding
    lookup and norms (the lm_head matmul counts)."""
    _, active = count_params(c)
    norms = c.num_hidden_layers * 2 * c.hidden_size + c.hidden_size
    return active - c.vocab_size * c.hidden_size - norms


def flops_per_token(c: LingConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward = 3x forward) per token at `seq_len`: 6 per matmul
    weight, plus causal attention scores and values, 2 * 2 * heads * head_dim * seq_len / 2 in
    the forward (the causal mask halves the work on average)."""
    attention_forward = 2 * c.num_attention_heads * c.head_dim * seq_len  # QK^T and AV, causal half
    return 6 * matmul_params_per_token(c) + 3 * c.num_hidden_layers * attention_forward
