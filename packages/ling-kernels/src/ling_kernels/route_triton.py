"""Triton MoE routing, forward and backward (imported only when Triton is, by
`ling_kernels.route`, for CUDA tensors; also runs under `TRITON_INTERPRET=1` on CPU).

One program per token, the whole expert row in registers (E <= a few hundred):
- forward: fp32 softmax, then k rounds of "take the largest, mask it out" (ties go to the
  lowest expert index), optional renormalisation of the k weights (HF rule: only when asked and
  k > 1, sum clamped at 1e-20). `tokens_per_expert` is a `torch.bincount` of the indices
  (deterministic; a kernel would need atomics for nothing measurable).
- backward: the gradient reaching the full probabilities (from `probs`, e.g. the balance loss,
  plus the k selected entries from the weights, through the renormalisation), then the
  softmax backward p * (g - <g, p>), all in fp32, cast to the scores' dtype.
Same contract and outputs as `ling_kernels.route.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_route"]


@triton.jit
def _route_forward_kernel(scores_ptr, probs_ptr, index_ptr, weight_ptr, E, TOP_K,
                          NORMALISE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    mask = experts < E
    scores = tl.load(scores_ptr + token * E + experts, mask=mask, other=-float("inf"))
    scores = scores.to(tl.float32)
    exp = tl.exp(scores - tl.max(scores, axis=0))
    exp = tl.where(mask, exp, 0.0)
    probs = exp / tl.sum(exp, axis=0)
    tl.store(probs_ptr + token * E + experts, probs, mask=mask)
    remaining = tl.where(mask, probs, -1.0)  # probabilities are >= 0, so -1 is never chosen
    picks = tl.arange(0, BLOCK_K)
    chosen_experts = tl.zeros([BLOCK_K], dtype=tl.int64)
    chosen_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in range(TOP_K):
        best = tl.max(remaining, axis=0)
        chosen = tl.min(tl.where(remaining == best, experts, BLOCK_E), axis=0)
        chosen_experts = tl.where(picks == j, chosen.to(tl.int64), chosen_experts)
        chosen_weights = tl.where(picks == j, best, chosen_weights)
        remaining = tl.where(experts == chosen, -1.0, remaining)
    if NORMALISE:
        chosen_weights = chosen_weights / tl.maximum(tl.sum(chosen_weights, axis=0), 1e-20)
    pick_mask = picks < TOP_K
    tl.store(index_ptr + token * TOP_K + picks, chosen_experts, mask=pick_mask)
    tl.store(weight_ptr + token * TOP_K + picks, chosen_weights, mask=pick_mask)


@triton.jit
def _route_backward_kernel(probs_ptr, grad_probs_ptr, index_ptr, weight_ptr, grad_weight_ptr,
                           grad_scores_ptr, E, TOP_K, HAS_GRAD_PROBS: tl.constexpr,
                           HAS_GRAD_WEIGHTS: tl.constexpr, NORMALISE: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    mask = experts < E
    probs = tl.load(probs_ptr + token * E + experts, mask=mask, other=0.0)
    grad = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_GRAD_PROBS:
        grad += tl.load(grad_probs_ptr + token * E + experts, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_WEIGHTS:
        picks = tl.arange(0, BLOCK_K)
        pick_mask = picks < TOP_K
        chosen = tl.load(index_ptr + token * TOP_K + picks, mask=pick_mask, other=-1)
        grad_weights = tl.load(grad_weight_ptr + token * TOP_K + picks, mask=pick_mask, other=0.0)
        grad_weights = grad_weights.to(tl.float32)
        if NORMALISE:
            # w_j = p_j / S with S = sum_l p_l: dL/dp_j = (g_j - sum_l g_l w_l) / S.
            weights = tl.load(weight_ptr + token * TOP_K + picks, mask=pick_mask, other=0.0)
            selected = tl.sum(tl.where(experts[None, :] == chosen[:, None], probs[None, :], 0.0),
                              axis=1)
            total = tl.maximum(tl.sum(selected, axis=0), 1e-20)
            grad_weights = (grad_weights - tl.sum(grad_weights * weights, axis=0)) / total
        grad += tl.sum(tl.where(experts[None, :] == chosen[:, None], grad_weights[:, None], 0.0),
                       axis=0)
    grad_scores = probs * (grad - tl.sum(grad * probs, axis=0))
    tl.store(grad_scores_ptr + token * E + experts,
             grad_scores.to(grad_scores_ptr.dtype.element_ty), mask=mask)


class _TritonRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, top_k, normalise):
        scores = scores.contiguous()
        num_tokens, num_experts = scores.shape
        probs = scores.new_empty(num_tokens, num_experts, dtype=torch.float32)
        indices = scores.new_empty(num_tokens, top_k, dtype=torch.int64)
        weights = scores.new_empty(num_tokens, top_k, dtype=torch.float32)
        if num_tokens:
            _route_forward_kernel[(num_tokens,)](
                scores, probs, indices, weights, num_experts, top_k, NORMALISE=normalise,
                BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k))
        ctx.save_for_backward(probs, indices, weights)
        ctx.normalise, ctx.scores_dtype = normalise, scores.dtype
        ctx.mark_non_differentiable(indices)
        return indices, weights, probs

    @staticmethod
    def backward(ctx, _grad_indices, grad_weights, grad_probs):
        probs, indices, weights = ctx.saved_tensors
        num_tokens, num_experts = probs.shape
        top_k = indices.shape[1]
        grad_scores = probs.new_empty(num_tokens, num_experts, dtype=ctx.scores_dtype)
        if num_tokens:
            _route_backward_kernel[(num_tokens,)](
                probs, probs if grad_probs is None else grad_probs.contiguous(), indices, weights,
                weights if grad_weights is None else grad_weights.contiguous(), grad_scores,
                num_experts, top_k, HAS_GRAD_PROBS=grad_probs is not None,
                HAS_GRAD_WEIGHTS=grad_weights is not None, NORMALISE=ctx.normalise,
                BLOCK_E=triton.next_power_of_2(num_experts),
                BLOCK_K=triton.next_power_of_2(top_k))
        return grad_scores, None, None


def triton_route(scores: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """(expert_indices, expert_weights, tokens_per_expert, probs) as the reference's RouteResult
    fields; `scores` is [T, E]."""
    indices, weights, probs = _TritonRoute.apply(scores, top_k, bool(norm_topk_prob and top_k > 1))
    tokens_per_expert = torch.bincount(indices.reshape(-1), minlength=scores.shape[1])
    return indices, weights, tokens_per_expert, probs
