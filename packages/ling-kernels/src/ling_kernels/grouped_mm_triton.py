"""Triton grouped GEMM, forward and backward (imported only when Triton is, by
`ling_kernels.grouped_mm`, for CUDA tensors; also runs under `TRITON_INTERPRET=1` on CPU).

Weights are one stacked [E, N, K] tensor (a list of per-expert weights is stacked by the
caller: one copy per call, which autograd undoes by unbinding the gradient). Three launches:

- forward, out[rows of e] = x[rows of e] @ W[e].T: one program per (row tile, N tile), where
  the row tiles are cut per expert on the host (the counts are host ints already), so a tile
  never straddles two experts and experts with no rows get no program;
- grad_x[rows of e] = grad_out[rows of e] @ W[e]: the same kernel, W read transposed through
  its strides;
- grad_W[e] = grad_out[rows of e].T @ x[rows of e]: one program per (expert, N tile, K tile)
  looping over that expert's rows; an expert with no rows writes zeros.
Accumulation is fp32 (`tl.dot`; "ieee" precision for fp32 inputs, so no TF32 rounding), the
result rounded once to the inputs' dtype. Tile sizes are fixed (64 x 64 x 32), not autotuned:
no GPU was available to tune them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["triton_grouped_mm"]

_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 32
# Triton's CPU interpreter (3.x) returns garbage from a bf16 x bf16 `tl.dot` (measured: 1e10
# errors) while fp32 is right; bf16 products are exact in fp32, so under the interpreter the
# operands are widened first, which is the same arithmetic the GPU's bf16 MMA does.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    elif INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _grouped_matmul_kernel(a_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                           N, K, stride_be, stride_bk, stride_bn, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[rows, :N] = a[rows, :K] @ B_e[:K, :N] for one row tile of one expert e, where
    B_e[k, n] = b[e * stride_be + k * stride_bk + n * stride_bn]; a and c row-major."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row_start = tl.load(tile_start_ptr + tile).to(tl.int64)
    row_end = tl.load(tile_end_ptr + tile).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < row_end, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + expert * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += _dot(a, b, IEEE, INTERPRETED)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_weight_grad_kernel(grad_ptr, x_ptr, grad_w_ptr, group_start_ptr, group_end_ptr,
                                N, K, IEEE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_w[e, n-tile, k-tile] = grad[rows of e, n-tile].T @ x[rows of e, k-tile]."""
    expert = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask, k_mask = ns < N, ks < K
    row_start = tl.load(group_start_ptr + expert).to(tl.int64)
    row_end = tl.load(group_end_ptr + expert).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m_start in range(row_start, row_end, BLOCK_M):
        rows = m_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        grad_t = tl.load(grad_ptr + rows[None, :] * N + ns[:, None],
                         mask=n_mask[:, None] & row_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += _dot(grad_t, x, IEEE, INTERPRETED)
    tl.store(grad_w_ptr + expert * N * K + ns[:, None] * K + ks[None, :],
             acc.to(grad_w_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def _row_tiles(counts: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(expert, first row, end row) of every BLOCK_M tile, cut per expert, on `device`."""
    experts, starts, ends = [], [], []
    start = 0
    for expert, count in enumerate(counts):
        for tile_start in range(start, start + count, _BLOCK_M):
            experts.append(expert)
            starts.append(tile_start)
            ends.append(start + count)
        start += count
    table = torch.tensor([experts, starts, ends], dtype=torch.int64).to(device, non_blocking=True)
    return table[0], table[1], table[2]


def _matmul(a, b, tiles, out_features, stride_bk, stride_bn):
    tile_expert, tile_start, tile_end = tiles
    out = a.new_zeros(a.shape[0], out_features) if a.shape[1] == 0 else a.new_empty(
        a.shape[0], out_features)
    if tile_expert.numel() and out_features and a.shape[1]:
        grid = (tile_expert.numel(), triton.cdiv(out_features, _BLOCK_N))
        _grouped_matmul_kernel[grid](
            a, b, out, tile_expert, tile_start, tile_end, out_features, a.shape[1],
            b.stride(0), stride_bk, stride_bn, IEEE=a.dtype == torch.float32, INTERPRETED=_INTERPRETED,
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K)
    return out


class _TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, counts):
        x, weights = x.contiguous(), weights.contiguous()
        tiles = _row_tiles(counts, x.device)
        # B_e[k, n] = W[e, n, k]
        out = _matmul(x, weights, tiles, weights.shape[1], weights.stride(2), weights.stride(1))
        ctx.save_for_backward(x, weights, *tiles)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, *tiles = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        num_experts, out_features, in_features = weights.shape
        grad_x = grad_weights = None
        if ctx.needs_input_grad[0]:
            # B_e[n, k] = W[e, n, k]: reduce over N, write K columns.
            grad_x = _matmul(grad_out, weights, tiles, in_features, weights.stride(1),
                             weights.stride(2))
        if ctx.needs_input_grad[1]:
            grad_weights = torch.empty_like(weights)
            if grad_weights.numel():
                ends = torch.tensor(ctx.counts, dtype=torch.int64).cumsum(0)
                bounds = torch.stack([ends - torch.tensor(ctx.counts), ends]).to(x.device)
                grid = (num_experts, triton.cdiv(out_features, _BLOCK_N),
                        triton.cdiv(in_features, _BLOCK_K))
                _grouped_weight_grad_kernel[grid](
                    grad_out, x, grad_weights, bounds[0], bounds[1], out_features, in_features,
                    IEEE=x.dtype == torch.float32, INTERPRETED=_INTERPRETED, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
                    BLOCK_K=_BLOCK_K)
        return grad_x, grad_weights, None


def triton_grouped_mm(x: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [M, K] grouped by expert (counts[e] rows each) times stacked weights [E, N, K]
    transposed: the reference's result without biases."""
    return _TritonGroupedMM.apply(x, weights, tuple(int(c) for c in counts))
