"""Triton RMSNorm forward and backward (imported only when Triton is, by `ling_kernels.rms_norm`).

One program normalises one row in a single block (H up to 65536 elements), keeping the fp32
reciprocal RMS per row for the backward. The backward gives dx per row and accumulates the
weight gradient over a strided set of rows per program in fp32 registers, writing one partial
row per program, which torch then sums: no atomics, deterministic.

Also runs under `TRITON_INTERPRET=1` on CPU tensors (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_rms_norm"]

_MAX_BLOCK = 65536


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, weight_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd * weight
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(
    grad_y_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, grad_weight_partial_ptr,
    n_rows, n_cols, BLOCK: tl.constexpr
):
    program = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK,), dtype=tl.float32)
    # Rows program, program + n_programs, ...; the last stride may run past n_rows, so rows are
    # masked rather than branched on (a masked row loads zeros, stores nothing, adds nothing).
    for first in range(0, n_rows, n_programs):
        row = first + program
        mask = cols < tl.where(row < n_rows, n_cols, 0)
        offset = row * n_cols
        x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
        grad_y = tl.load(grad_y_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))
        normed = x * rstd
        grad_normed = grad_y * weight
        # d normed_i / d x_j = rstd * (delta_ij - normed_i * normed_j / H)
        dot = tl.sum(grad_normed * normed, axis=0) / n_cols
        grad_x = rstd * (grad_normed - normed * dot)
        tl.store(grad_x_ptr + offset + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_weight += grad_y * normed
    tl.store(grad_weight_partial_ptr + program * n_cols + cols, grad_weight, mask=col_mask)


def _block_size(n_cols: int) -> int:
    block = triton.next_power_of_2(n_cols)
    if block > _MAX_BLOCK:
        raise ValueError(f"triton rms_norm handles rows of at most {_MAX_BLOCK}, got {n_cols}")
    return block


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        processors = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 4 * processors))
    return max(1, min(n_rows, 4))


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        weight_c = weight.contiguous()
        n_rows, n_cols = x2d.shape
        y = torch.empty_like(x2d)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = _block_size(n_cols)
        if n_rows:
            _rms_norm_forward_kernel[(n_rows,)](
                x2d, weight_c, y, rstd, n_cols, eps, BLOCK=block, num_warps=_num_warps(block)
            )
        ctx.save_for_backward(x2d, weight_c, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        grad_y2d = grad_y.reshape(-1, n_cols).contiguous()
        grad_x = torch.empty_like(x2d)
        programs = _backward_programs(n_rows, x2d.device)
        partial = torch.zeros(programs, n_cols, dtype=torch.float32, device=x2d.device)
        block = _block_size(n_cols)
        if n_rows:
            _rms_norm_backward_kernel[(programs,)](
                grad_y2d, x2d, weight, rstd, grad_x, partial, n_rows, n_cols,
                BLOCK=block, num_warps=_num_warps(block),
            )
        grad_weight = partial.sum(dim=0).to(weight.dtype)
        return grad_x.reshape(ctx.shape), grad_weight, None


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm by the Triton kernels; same contract as `ling_kernels.rms_norm.reference`."""
    return _TritonRMSNorm.apply(x, weight, float(eps))
