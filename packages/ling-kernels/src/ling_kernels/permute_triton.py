"""Triton permute / unpermute, forward and backward (imported only when Triton is, by
`ling_kernels.permute`, for CUDA tensors; also runs under `TRITON_INTERPRET=1` on CPU).

Every kernel is driven by `slot_of_assignment` alone: assignment a = t * k + j (token t's j-th
expert choice) lives in permuted row `slot_of_assignment[a]`, a permutation, so each program
writes rows no other program writes. No atomics anywhere: deterministic, and the backward of
each direction is a gather, as in the plain-torch fast path.

- permute forward: program a copies x[a // k] to row slot_of_assignment[a].
- permute backward: program t sums the k rows of its slots (fp32) into grad_x[t].
- unpermute forward: program t sums w[t, j] * expert_out[slot(t, j)] over j in fp32.
- unpermute backward: program a writes grad_expert_out[slot(a)] = w[a] * grad_out[a // k] and
  grad_w[a] = <expert_out[slot(a)], grad_out[a // k]> (fp32 dot product over H).
Rows are walked in BLOCK_H chunks, so any hidden size works with one program per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_permute", "triton_unpermute"]


@triton.jit
def _permute_forward_kernel(x_ptr, slot_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    assignment = tl.program_id(0).to(tl.int64)
    token = assignment // TOP_K
    slot = tl.load(slot_ptr + assignment)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < H
        row = tl.load(x_ptr + token * H + cols, mask=mask)
        tl.store(out_ptr + slot * H + cols, row, mask=mask)


@triton.jit
def _sum_slots_kernel(expert_out_ptr, weight_ptr, slot_ptr, out_ptr, H, TOP_K: tl.constexpr,
                      WEIGHTED: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_j w[t, j] * rows[slot(t, j)] (fp32): unpermute's forward, and with all
    weights 1 (WEIGHTED False, weight_ptr unused) permute's backward."""
    token = tl.program_id(0).to(tl.int64)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in range(TOP_K):
            slot = tl.load(slot_ptr + token * TOP_K + j)
            row = tl.load(expert_out_ptr + slot * H + cols, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                row *= tl.load(weight_ptr + token * TOP_K + j).to(tl.float32)
            acc += row
        tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_backward_kernel(grad_out_ptr, expert_out_ptr, weight_ptr, slot_ptr,
                               grad_expert_out_ptr, grad_weight_ptr, H,
                               TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    assignment = tl.program_id(0).to(tl.int64)
    token = assignment // TOP_K
    slot = tl.load(slot_ptr + assignment)
    weight = tl.load(weight_ptr + assignment).to(tl.float32)
    dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < H
        grad = tl.load(grad_out_ptr + token * H + cols, mask=mask, other=0.0).to(tl.float32)
        row = tl.load(expert_out_ptr + slot * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_expert_out_ptr + slot * H + cols,
                 (weight * grad).to(grad_expert_out_ptr.dtype.element_ty), mask=mask)
        dot += grad * row
    tl.store(grad_weight_ptr + assignment, tl.sum(dot, axis=0).to(grad_weight_ptr.dtype.element_ty))


def _block_h(hidden: int) -> int:
    return min(triton.next_power_of_2(max(hidden, 1)), 1024)


class _TritonPermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slot_of_assignment, top_k):
        x = x.contiguous()
        num_tokens, hidden = x.shape
        out = x.new_empty(num_tokens * top_k, hidden)
        if out.numel():
            _permute_forward_kernel[(num_tokens * top_k,)](
                x, slot_of_assignment, out, hidden, TOP_K=top_k, BLOCK_H=_block_h(hidden))
        ctx.save_for_backward(slot_of_assignment)
        ctx.top_k, ctx.num_tokens = top_k, num_tokens
        return out

    @staticmethod
    def backward(ctx, grad_permuted):
        (slot_of_assignment,) = ctx.saved_tensors
        grad_permuted = grad_permuted.contiguous()
        hidden = grad_permuted.shape[1]
        grad_x = grad_permuted.new_empty(ctx.num_tokens, hidden)
        if grad_x.numel():
            _sum_slots_kernel[(ctx.num_tokens,)](
                grad_permuted, grad_permuted, slot_of_assignment, grad_x, hidden, TOP_K=ctx.top_k,
                WEIGHTED=False, BLOCK_H=_block_h(hidden))
        return grad_x, None, None


class _TritonUnpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, expert_weights, slot_of_assignment):
        expert_out, expert_weights = expert_out.contiguous(), expert_weights.contiguous()
        num_tokens, top_k = expert_weights.shape
        hidden = expert_out.shape[1]
        out = expert_out.new_empty(num_tokens, hidden)
        if out.numel():
            _sum_slots_kernel[(num_tokens,)](
                expert_out, expert_weights, slot_of_assignment, out, hidden, TOP_K=top_k,
                WEIGHTED=True, BLOCK_H=_block_h(hidden))
        ctx.save_for_backward(expert_out, expert_weights, slot_of_assignment)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, expert_weights, slot_of_assignment = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        num_tokens, top_k = expert_weights.shape
        hidden = expert_out.shape[1]
        grad_expert_out = torch.empty_like(expert_out)
        grad_weights = torch.empty_like(expert_weights)
        if expert_weights.numel():
            _unpermute_backward_kernel[(num_tokens * top_k,)](
                grad_out, expert_out, expert_weights, slot_of_assignment, grad_expert_out,
                grad_weights, hidden, TOP_K=top_k, BLOCK_H=_block_h(hidden))
        return grad_expert_out, grad_weights, None


def triton_permute(x: torch.Tensor, slot_of_assignment: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of x copied to their slots ([T*k, H]); same values as `reference_permute`."""
    return _TritonPermute.apply(x, slot_of_assignment.contiguous(), top_k)


def triton_unpermute(expert_out: torch.Tensor, expert_weights: torch.Tensor,
                     slot_of_assignment: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k rows (fp32 inside, expert_out's dtype out);
    `expert_weights` is [T, k]."""
    return _TritonUnpermute.apply(expert_out, expert_weights, slot_of_assignment.contiguous())
