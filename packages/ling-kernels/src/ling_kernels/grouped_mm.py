"""Grouped GEMM: one `F.linear` per expert over that expert's contiguous block of rows.

`grouped_mm(x [M, K], weights, tokens_per_expert, biases=None) -> [M, N]`: rows are grouped by
expert (as `ling_kernels.permute` leaves them), group e holding `tokens_per_expert[e]` rows
(which sum to M; zero is allowed), and `out[group e] = x[group e] @ weights[e].T (+ biases[e])`.
`weights` is a stacked [E, N, K] tensor or a sequence of E [N, K] tensors (nn.Linear layout,
so per-expert modules with HF weight names can be passed without stacking, which would copy
every expert weight each step). An expert with no rows gets a zero weight gradient.

Paths, chosen per call by `ling_kernels.dispatch`:

- `reference`: a Python loop of `F.linear` per group and a `torch.cat` (autograd builds one
  node per expert).
- fast on CUDA (speed unmeasured: no GPU was available): `torch._grouped_mm` (CUTLASS) over
  the stacked weights where `torch_grouped_mm_supported` (bf16, compute capability >= 9.0,
  K and N multiples of 8); otherwise the Triton kernels of `ling_kernels.grouped_mm_triton`.
  Both need the weights stacked [E, N, K]: a list is stacked per call (one copy of the
  expert weights). Biases are added per row afterwards.
- fast elsewhere (CPU, or CUDA without Triton): `_GroupedLinear`, one `torch.autograd.Function` that writes each
  group's product straight into one preallocated output (`torch.mm(out=)`, no cat) and does the
  backward as two matmuls per group (grad_x into one preallocated buffer, grad_W per expert).
  On CPU `torch._grouped_mm` over stacked weights was measured at the benchmark block's shape
  (12288 rows, 64 experts, K 1024, N 704, forward, 2 threads): 0.115-0.120 s against this
  loop's 0.115-0.116 s, the same speed, and it needs the weights stacked (a copy of every
  expert weight per step), so the loop is kept. One thread's CPU time for fwd+bwd: 0.96x the
  reference's (`scripts/measure_ops.py --threads 1 --cpu-time`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ling_kernels.allocator import keep_freed_memory_if_training
from ling_kernels.dispatch import use_fast_path
from ling_kernels.triton_support import triton_importable

__all__ = ["grouped_mm", "reference", "torch_grouped_mm", "torch_grouped_mm_supported"]

Weights = torch.Tensor | Sequence[torch.Tensor]


def reference(
    x: torch.Tensor,
    weights: Weights,
    tokens_per_expert: torch.Tensor | Sequence[int],
    biases: Weights | None = None,
) -> torch.Tensor:
    """The specification: `F.linear` on each group of rows, concatenated in group order."""
    counts = _counts(x, weights, tokens_per_expert, biases)
    groups = x.split(counts)
    outputs = [
        F.linear(group, weights[e], None if biases is None else biases[e])
        for e, group in enumerate(groups)
    ]
    return torch.cat(outputs) if outputs else x.new_zeros(0, 0)


def grouped_mm(
    x: torch.Tensor,
    weights: Weights,
    tokens_per_expert: torch.Tensor | Sequence[int],
    biases: Weights | None = None,
) -> torch.Tensor:
    """Per-expert linear over grouped rows; see the module docstring for the contract."""
    counts = _counts(x, weights, tokens_per_expert, biases)
    if not use_fast_path("grouped_mm", available=True):
        return reference(x, weights, counts, biases)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom Function is opaque to autocast: cast as autocast would for F.linear, then
        # run with it off so the hand-written backward sees one dtype.
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        weights = weights.to(dtype) if isinstance(weights, torch.Tensor) else [w.to(dtype) for w in weights]
        if biases is not None:
            biases = biases.to(dtype) if isinstance(biases, torch.Tensor) else [b.to(dtype) for b in biases]
        with torch.autocast(device_type, enabled=False):
            return _fast_path(x, weights, counts, biases)
    return _fast_path(x, weights, counts, biases)


def torch_grouped_mm_supported(x: torch.Tensor, weights: Weights) -> bool:
    """Whether `torch._grouped_mm` (CUTLASS grouped GEMM) serves these inputs: CUDA, bf16,
    compute capability >= 9.0 (Hopper; the op's requirement), and K, N multiples of 8 (its
    16-byte alignment rule for bf16 rows)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    out_features = weights.shape[1] if isinstance(weights, torch.Tensor) else weights[0].shape[0]
    return (torch.cuda.get_device_capability(x.device) >= (9, 0)
            and x.shape[1] % 8 == 0 and out_features % 8 == 0)


def _stacked(weights: Weights) -> torch.Tensor:
    """[E, N, K]; a list is stacked (one copy per call; autograd unbinds the gradient back)."""
    return weights if isinstance(weights, torch.Tensor) else torch.stack(list(weights))


def _fast_path(x, weights, counts, biases):
    """CUDA: `torch._grouped_mm` where supported, else the Triton kernels; elsewhere (or CUDA
    without Triton) the `mm`-per-expert Function. Biases: added per row after the CUDA paths."""
    if x.is_cuda and torch_grouped_mm_supported(x, weights):
        out = torch_grouped_mm(x, _stacked(weights), counts)
    elif x.is_cuda and triton_importable():
        from ling_kernels.grouped_mm_triton import triton_grouped_mm

        out = triton_grouped_mm(x, _stacked(weights), counts)
    else:
        return _loop_of_mm(x, weights, counts, biases)
    return out if biases is None else add_row_biases(out, biases, counts)


def add_row_biases(out: torch.Tensor, biases: Weights, counts: list[int]) -> torch.Tensor:
    """out + biases[e] on every row of group e (differentiable in both)."""
    counts_on_device = torch.tensor(counts, device=out.device)
    return out + _stacked(biases).repeat_interleave(counts_on_device, dim=0, output_size=out.shape[0])


def _loop_of_mm(x, weights, counts, biases):
    weight_list = list(weights.unbind(0)) if isinstance(weights, torch.Tensor) else list(weights)
    keep_freed_memory_if_training([x, *weight_list])  # this step's expert gradients: reuse, not fresh pages
    bias_list = (
        [] if biases is None
        else list(biases.unbind(0)) if isinstance(biases, torch.Tensor) else list(biases)
    )
    return _GroupedLinear.apply(x, tuple(counts), bool(bias_list), *weight_list, *bias_list)


def torch_grouped_mm(x: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`torch._grouped_mm` over stacked [E, N, K] weights (no biases). Runs on any device
    torch implements it for (CPU too, which is how it is tested here); the upstream gradient
    is made contiguous first, as the op's backward rejects broadcast (stride-0) gradients."""
    offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(x.device)
    out = torch._grouped_mm(x, weights.transpose(-2, -1), offs=offsets)
    return _ContiguousGrad.apply(out)


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; makes the incoming gradient contiguous for the op before it."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _counts(x, weights, tokens_per_expert, biases) -> list[int]:
    """Validate the shapes and return tokens_per_expert as Python ints (one host sync)."""
    num_experts = weights.shape[0] if isinstance(weights, torch.Tensor) else len(weights)
    counts = (
        tokens_per_expert.tolist()
        if isinstance(tokens_per_expert, torch.Tensor)
        else [int(c) for c in tokens_per_expert]
    )
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, K], got shape {tuple(x.shape)}")
    if len(counts) != num_experts:
        raise ValueError(
            f"tokens_per_expert has {len(counts)} entries but there are {num_experts} weights"
        )
    if any(c < 0 for c in counts) or sum(counts) != x.shape[0]:
        raise ValueError(
            f"tokens_per_expert must be non-negative and sum to x's {x.shape[0]} rows, "
            f"got sum {sum(counts)} (min {min(counts, default=0)})"
        )
    for e in range(num_experts):
        w = weights[e]
        if w.dim() != 2 or w.shape[1] != x.shape[1] or w.shape != weights[0].shape:
            raise ValueError(
                f"weights[{e}] must be [N, K] with K = {x.shape[1]} (x's columns) and the "
                f"same N for every expert, got {tuple(w.shape)}"
            )
        if biases is not None and biases[e].shape != w.shape[:1]:
            raise ValueError(f"biases[{e}] must be [N] = [{w.shape[0]}], got {tuple(biases[e].shape)}")
    if biases is not None and len(biases) != num_experts:
        raise ValueError(f"biases has {len(biases)} entries, expected {num_experts}")
    return counts


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, has_bias, *params):
        num_experts = len(counts)
        weights, biases = params[:num_experts], params[num_experts:]
        out_features = weights[0].shape[0]
        out = x.new_empty(x.shape[0], out_features)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                if has_bias:
                    torch.addmm(biases[e], x[rows], weights[e].t(), out=out[rows])
                else:
                    torch.mm(x[rows], weights[e].t(), out=out[rows])
            start += count
        ctx.counts, ctx.has_bias = counts, has_bias
        ctx.save_for_backward(x, *weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, *weights = ctx.saved_tensors
        counts, has_bias = ctx.counts, ctx.has_bias
        grad_out = grad_out.contiguous()
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        grad_x = torch.empty_like(x) if need_x else None
        grad_weights, grad_biases = [], []
        start = 0
        for e, count in enumerate(counts):
            rows = slice(start, start + count)
            start += count
            g = grad_out[rows]
            if need_x and count:
                torch.mm(g, weights[e], out=grad_x[rows])
            if need_params[e]:
                grad_weights.append(
                    g.t().mm(x[rows]) if count else torch.zeros_like(weights[e])
                )
            else:
                grad_weights.append(None)
            if has_bias:
                grad_biases.append(
                    g.sum(0, dtype=torch.float32).to(g.dtype) if need_params[len(counts) + e] else None
                )
        return (grad_x, None, None, *grad_weights, *grad_biases)
