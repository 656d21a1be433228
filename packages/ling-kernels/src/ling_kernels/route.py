"""MoE routing: softmax over experts -> top-k -> optional renormalisation of the k weights.

`route(scores [T, E], top_k, norm_topk_prob) -> RouteResult`: computed in fp32 whatever the
scores' dtype (bf16 scores flip near-tied top-k choices between devices); `probs` is the full
softmax, kept for the load-balancing loss. As HF Ling/Qwen-MoE, renormalisation applies only
when `norm_topk_prob` and k > 1 (with k = 1 the weight stays the raw probability, so the
router still gets a gradient through it), with the sum clamped at 1e-20.

Paths, chosen per call by `ling_kernels.dispatch`:
- `reference` (plain torch): the only path on CPU, where the op is ~1 ms of a ~1.4 s MoE block
  (profile in the README), so there is nothing to win.
- CUDA with Triton importable: one kernel per direction (`ling_kernels.route_triton`): softmax,
  top-k and renormalisation in one pass over each token's scores instead of ~6 launches and
  their [T, E] temporaries; `auto` takes it on CUDA (speed unmeasured: no GPU was available).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ling_kernels.dispatch import use_fast_path
from ling_kernels.triton_support import triton_importable

__all__ = ["RouteResult", "route", "reference"]


@dataclass
class RouteResult:
    expert_indices: torch.Tensor  # [T, k] int64, distinct experts per token, best first
    expert_weights: torch.Tensor  # [T, k] float32 combine weights (differentiable)
    tokens_per_expert: torch.Tensor  # [E] int64
    probs: torch.Tensor  # [T, E] float32 softmax (differentiable), for the balance loss


def reference(scores: torch.Tensor, top_k: int, norm_topk_prob: bool) -> RouteResult:
    """The specification: fp32 softmax, top-k, renormalise when asked and k > 1, bincount."""
    probs = scores.float().softmax(dim=-1)
    weights, indices = probs.topk(top_k, dim=-1)
    if norm_topk_prob and top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    tokens_per_expert = torch.bincount(indices.reshape(-1), minlength=scores.shape[-1])
    return RouteResult(indices, weights, tokens_per_expert, probs)


def route(scores: torch.Tensor, top_k: int, norm_topk_prob: bool) -> RouteResult:
    """Route each of T tokens to `top_k` of E experts from router scores [T, E]."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [tokens, experts], got shape {tuple(scores.shape)}")
    if not 1 <= top_k <= scores.shape[1]:
        raise ValueError(f"top_k must be in [1, {scores.shape[1]}] (the experts), got {top_k}")
    if not use_fast_path("route", available=scores.is_cuda and triton_importable()):
        return reference(scores, top_k, norm_topk_prob)
    from ling_kernels.route_triton import triton_route

    return RouteResult(*triton_route(scores, top_k, norm_topk_prob))
