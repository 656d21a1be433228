"""Sort token copies by expert (`permute`) and combine the experts' outputs back (`unpermute`).

`permute(x [T, H], expert_indices [T, k], num_experts) -> (permuted [T*k, H], PermuteMap)`:
row s of `permuted` is a copy of token `map.token_of_slot[s]`; rows are grouped by expert in
expert order (stable: within an expert, in token order), `map.tokens_per_expert[e]` rows each,
ready for `ling_kernels.grouped_mm`. `map.slot_of_assignment[t * k + j]` is the row holding
token t's j-th expert choice (the inverse permutation).

`unpermute(expert_out [T*k, H], map, expert_weights [T, k]) -> [T, H]`: out[t] = sum_j
expert_weights[t, j] * expert_out[slot_of_assignment[t*k + j]], summed in fp32 and cast to
expert_out's dtype; differentiable in expert_out and expert_weights.

Paths, chosen per call by `ling_kernels.dispatch`:

- `reference`: advanced indexing `x[token_of_slot]` (its backward is a sort-based
  `index_put` with accumulation) and a weighted `index_add` scatter back to tokens.
- fast (every device): `torch.autograd.Function`s that only ever gather. Each token has
  exactly k slots, so the scatter-adds of both directions become a gather of k rows per token
  and a sum over k: permute's backward is `grad.index_select(0, slot_of_assignment)`
  viewed [T, k, H] and summed over k, unpermute's forward the same with the weights, and unpermute's
  backward gathers rows back by `token_of_slot`. Gathers write each output row once, so they
  parallelise without atomics and are deterministic.
- fast on CUDA with Triton importable: the same gathers as Triton kernels
  (`ling_kernels.permute_triton`), one program per row, fp32 sums, no [T, k, H] temporaries;
  `auto` takes them on CUDA (speed unmeasured: no GPU was available). On CPU `auto` keeps the reference: one thread's CPU time at the
  benchmark block's shape was 1.41x (permute) and 1.06x (unpermute) the reference's
  (`scripts/measure_ops.py --threads 1 --cpu-time`, README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ling_kernels.dispatch import use_fast_path
from ling_kernels.triton_support import triton_importable

__all__ = ["PermuteMap", "permute", "unpermute", "make_permute_map", "reference_permute",
           "reference_unpermute"]


@dataclass
class PermuteMap:
    token_of_slot: torch.Tensor  # [T*k] int64: the token each permuted row copies
    slot_of_assignment: torch.Tensor  # [T*k] int64: row of (token t, choice j) at t*k + j
    tokens_per_expert: torch.Tensor  # [num_experts] int64: rows per expert, in expert order
    top_k: int


def make_permute_map(expert_indices: torch.Tensor, num_experts: int) -> PermuteMap:
    """The index maps for `expert_indices` [T, k] (values in [0, num_experts))."""
    if expert_indices.dim() != 2:
        raise ValueError(f"expert_indices must be [tokens, k], got {tuple(expert_indices.shape)}")
    flat = expert_indices.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(
            f"expert_indices must lie in [0, {num_experts}), got range "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    top_k = expert_indices.shape[1]
    slot_order = flat.argsort(stable=True)  # assignment held by each permuted row
    slot_of_assignment = torch.empty_like(slot_order)
    slot_of_assignment[slot_order] = torch.arange(flat.numel(), device=flat.device)
    return PermuteMap(
        token_of_slot=slot_order // max(top_k, 1),
        slot_of_assignment=slot_of_assignment,
        tokens_per_expert=torch.bincount(flat, minlength=num_experts),
        top_k=top_k,
    )


def reference_permute(
    x: torch.Tensor, expert_indices: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, PermuteMap]:
    """The specification: copies of the tokens, sorted by expert, by advanced indexing."""
    permute_map = make_permute_map(expert_indices, num_experts)
    return x[permute_map.token_of_slot], permute_map


def reference_unpermute(
    expert_out: torch.Tensor, permute_map: PermuteMap, expert_weights: torch.Tensor
) -> torch.Tensor:
    """The specification: weight each row (fp32) and scatter-add it back to its token."""
    num_tokens = permute_map.slot_of_assignment.numel() // max(permute_map.top_k, 1)
    slot_weights = expert_weights.reshape(-1)[permute_map.slot_of_assignment.argsort()]
    weighted = expert_out.float() * slot_weights.float()[:, None]
    out = expert_out.new_zeros(num_tokens, expert_out.shape[1], dtype=torch.float32)
    out = out.index_put((permute_map.token_of_slot,), weighted, accumulate=True)
    return out.to(expert_out.dtype)


def permute(
    x: torch.Tensor, expert_indices: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, PermuteMap]:
    """Copies of x's rows grouped by expert, and the maps to undo it (module docstring)."""
    if x.dim() != 2 or expert_indices.shape[:1] != x.shape[:1]:
        raise ValueError(
            f"x must be [tokens, H] and expert_indices [tokens, k] with the same tokens, got "
            f"{tuple(x.shape)} and {tuple(expert_indices.shape)}"
        )
    if not use_fast_path("permute", available=True, preferred=not x.is_cpu):
        return reference_permute(x, expert_indices, num_experts)
    permute_map = make_permute_map(expert_indices, num_experts)
    if x.is_cuda and triton_importable():
        from ling_kernels.permute_triton import triton_permute

        return triton_permute(x, permute_map.slot_of_assignment, permute_map.top_k), permute_map
    return _Permute.apply(x, permute_map.token_of_slot, permute_map.slot_of_assignment,
                          permute_map.top_k), permute_map


def unpermute(
    expert_out: torch.Tensor, permute_map: PermuteMap, expert_weights: torch.Tensor
) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs (module docstring)."""
    slots = permute_map.slot_of_assignment.numel()
    if expert_out.dim() != 2 or expert_out.shape[0] != slots or expert_weights.numel() != slots:
        raise ValueError(
            f"expert_out must be [{slots}, H] and expert_weights [tokens, k] with {slots} "
            f"entries, got {tuple(expert_out.shape)} and {tuple(expert_weights.shape)}"
        )
    if not use_fast_path("unpermute", available=True, preferred=not expert_out.is_cpu):
        return reference_unpermute(expert_out, permute_map, expert_weights)
    if expert_out.is_cuda and triton_importable():
        from ling_kernels.permute_triton import triton_unpermute

        return triton_unpermute(expert_out, expert_weights.reshape(-1, max(permute_map.top_k, 1)),
                                permute_map.slot_of_assignment)
    return _Unpermute.apply(
        expert_out, expert_weights.reshape(-1, max(permute_map.top_k, 1)),
        permute_map.token_of_slot, permute_map.slot_of_assignment,
    )


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_of_slot, slot_of_assignment, top_k):
        ctx.save_for_backward(slot_of_assignment)
        ctx.top_k, ctx.num_tokens = top_k, x.shape[0]
        return x.index_select(0, token_of_slot)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_permuted):
        (slot_of_assignment,) = ctx.saved_tensors
        hidden = grad_permuted.shape[1]
        gathered = grad_permuted.index_select(0, slot_of_assignment)
        # Sum over k as [T, 1, k] @ [T, k, H]: measured ~20% faster than .sum(1) on CPU.
        ones = gathered.new_ones(ctx.num_tokens, 1, ctx.top_k)
        grad_x = torch.bmm(ones, gathered.view(ctx.num_tokens, ctx.top_k, hidden)).squeeze(1)
        return grad_x, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, expert_weights, token_of_slot, slot_of_assignment):
        num_tokens, top_k = expert_weights.shape
        gathered = expert_out.index_select(0, slot_of_assignment).view(num_tokens, top_k, -1)
        # [T, 1, k] @ [T, k, H]: the weighted sum over k in one batched matmul (fp32 accumulate).
        out = torch.bmm(expert_weights.float()[:, None, :], gathered.float()).squeeze(1)
        ctx.save_for_backward(expert_out, expert_weights, token_of_slot, slot_of_assignment)
        return out.to(expert_out.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        expert_out, expert_weights, token_of_slot, slot_of_assignment = ctx.saved_tensors
        num_tokens, top_k = expert_weights.shape
        grad32 = grad_out.float()
        grad_expert_out = grad_weights = None
        if ctx.needs_input_grad[0]:
            slot_weights = torch.empty_like(expert_weights.reshape(-1), dtype=torch.float32)
            slot_weights[slot_of_assignment] = expert_weights.reshape(-1).float()
            grad_expert_out = (grad32.index_select(0, token_of_slot) * slot_weights[:, None]).to(
                expert_out.dtype
            )
        if ctx.needs_input_grad[1]:
            gathered = expert_out.index_select(0, slot_of_assignment).view(num_tokens, top_k, -1)
            # d out[t] / d w[t, j] = expert_out row of (t, j): [T, k, H] @ [T, H, 1].
            grad_weights = torch.bmm(gathered.float(), grad32[:, :, None]).squeeze(2).to(
                expert_weights.dtype
            )
        return grad_expert_out, grad_weights, None, None
