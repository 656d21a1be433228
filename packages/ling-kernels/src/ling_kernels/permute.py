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
- fast (every device): `torch.autograd.Function`s. `unpermute` gathers, per choice j, every
  token's j-th row and accumulates them into one fp32 [T, H] buffer (`addcmul_` by the
  weights), so no [T*k, H] weighted copy or scatter-add exists; its backward gathers rows back
  by `token_of_slot` and takes the weight gradients as k row-wise dot products. `auto` takes it
  on CPU: one thread's fwd+bwd CPU time at the benchmark block's shape is 0.38x (fp32) / 0.44x
  (bf16) the reference's with `keep_freed_memory()`, 0.70x without
  (`scripts/measure_ops.py --threads 1 --cpu-time [--keep-freed-memory]`). `permute`'s forward
  is the reference's gather (`index_select`); its backward is `index_add_` on CPU
  (deterministic there) and a gather of each token's k rows plus a sum elsewhere (a scatter-add
  would need atomics). `auto` takes it on CPU too: the reference's backward,
  `index_put(accumulate=True)`, does not scale with threads. Gradient of a [T*k, H] permuted
  batch into [T, H], fp32, best of 20: T 2048, k 2, H 256 (tiny preset): index_put 0.46 ms
  at 1 thread but 3.59 ms at 2, index_add_ 0.11 ms at both; T 2048, k 6, H 1024 (benchmark
  block): index_put 4.94 / 34.5 ms, index_add_ 3.05 / 1.90 ms at 1 / 2 threads.
- fast on CUDA with Triton importable: the same gathers as Triton kernels
  (`ling_kernels.permute_triton`), one program per row, fp32 sums, no [T, k, H] temporaries;
  `auto` takes them on CUDA (speed unmeasured: no GPU was available).
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
    if not use_fast_path("permute", available=True):
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
    if not use_fast_path("unpermute", available=True):
        return reference_unpermute(expert_out, permute_map, expert_weights)
    if expert_out.is_cuda and triton_importable():
        from ling_kernels.permute_triton import triton_unpermute

        return triton_unpermute(expert_out, expert_weights.reshape(-1, max(permute_map.top_k, 1)),
                                permute_map.slot_of_assignment)
    return _Unpermute.apply(
        expert_out, expert_weights.reshape(-1, max(permute_map.top_k, 1)),
        permute_map.token_of_slot, permute_map.slot_of_assignment,
    )


def _slots_by_choice(slot_of_assignment: torch.Tensor, top_k: int) -> torch.Tensor:
    """[k, T]: row j holds the slots of every token's j-th choice (contiguous, for index_select)."""
    return slot_of_assignment.view(-1, top_k).t().contiguous()


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_of_slot, slot_of_assignment, top_k):
        ctx.save_for_backward(token_of_slot, slot_of_assignment)
        ctx.top_k, ctx.num_tokens = top_k, x.shape[0]
        return x.index_select(0, token_of_slot)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_permuted):
        token_of_slot, slot_of_assignment = ctx.saved_tensors
        hidden = grad_permuted.shape[1]
        if grad_permuted.is_cpu:
            # CPU: index_add_ is deterministic and reads each row once (1 thread, block shape:
            # 5.5 ms vs 9.9 ms for the reference's index_put and 40 ms for a gather + sum).
            grad_x = grad_permuted.new_zeros(ctx.num_tokens, hidden, dtype=torch.float32)
            grad_x.index_add_(0, token_of_slot, grad_permuted.float())
            return grad_x.to(grad_permuted.dtype), None, None, None
        # Elsewhere a scatter-add means atomics (non-deterministic): gather each token's k rows.
        gathered = grad_permuted.index_select(0, slot_of_assignment)
        ones = gathered.new_ones(ctx.num_tokens, 1, ctx.top_k)
        grad_x = torch.bmm(ones, gathered.view(ctx.num_tokens, ctx.top_k, hidden)).squeeze(1)
        return grad_x, None, None, None


class _Unpermute(torch.autograd.Function):
    """Per choice j, gather the T rows of every token's j-th expert and accumulate them into one
    fp32 [T, H] buffer (addcmul_ by the weights): no [T, k, H] temporary. Backward likewise per
    j for the weight gradients (a row-wise dot product each). 1 thread, block shape: forward
    9.8 ms vs 36.7 ms (reference) and backward 53 ms vs 110 ms for the earlier single gather
    + bmm version."""

    @staticmethod
    def forward(ctx, expert_out, expert_weights, token_of_slot, slot_of_assignment):
        top_k = expert_weights.shape[1]
        slots = _slots_by_choice(slot_of_assignment, top_k)
        weights32 = expert_weights.float()
        out = expert_out.index_select(0, slots[0]).float().mul_(weights32[:, :1])
        for j in range(1, top_k):
            out.addcmul_(expert_out.index_select(0, slots[j]), weights32[:, j:j + 1])
        ctx.save_for_backward(expert_out, expert_weights, token_of_slot, slot_of_assignment)
        return out.to(expert_out.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        expert_out, expert_weights, token_of_slot, slot_of_assignment = ctx.saved_tensors
        top_k = expert_weights.shape[1]
        grad32 = grad_out.float()
        grad_expert_out = grad_weights = None
        if ctx.needs_input_grad[0]:
            slot_weights = torch.empty_like(expert_weights.reshape(-1), dtype=torch.float32)
            slot_weights[slot_of_assignment] = expert_weights.reshape(-1).float()
            grad_expert_out = grad32.index_select(0, token_of_slot).mul_(slot_weights[:, None])
            grad_expert_out = grad_expert_out.to(expert_out.dtype)
        if ctx.needs_input_grad[1]:
            # d out[t] / d w[t, j] = expert_out row of (t, j): a dot product with grad_out[t].
            slots = _slots_by_choice(slot_of_assignment, top_k)
            grad_weights = torch.stack(
                [(expert_out.index_select(0, slots[j]).float() * grad32).sum(1) for j in range(top_k)],
                dim=1,
            ).to(expert_weights.dtype)
        return grad_expert_out, grad_weights, None, None
