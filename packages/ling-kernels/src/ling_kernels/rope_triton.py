"""Triton rotate-half RoPE, forward and backward (imported only when Triton is, by
`ling_kernels.rope`).

One program rotates one head vector at one position: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
over the two halves, in fp32. RoPE is a rotation, so its backward is the same kernel with the
angle negated (sin -> -sin) applied to the incoming gradient; nothing but cos and sin is saved.
Reads q and k through their strides (the model's q and k are transposed views of the fused
qkv projection) and writes contiguous [B, H, S, D] outputs. Uses the first half of each
cos/sin row: the HF tables repeat the angles over both halves (the caller's contract).
Also runs under `TRITON_INTERPRET=1` on CPU tensors (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_apply_rope"]


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr, heads, seq, half,
    stride_b, stride_h, stride_s, stride_d, sin_sign, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (batch, head, position), row-major
    position = row % seq
    head = (row // seq) % heads
    batch = row // (seq * heads)
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    base = batch * stride_b + head * stride_h + position * stride_s
    x1 = tl.load(x_ptr + base + cols * stride_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + (cols + half) * stride_d, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + position * 2 * half + cols, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + position * 2 * half + cols, mask=mask, other=0.0) * sin_sign
    out_base = row * 2 * half
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + out_base + cols, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(out_ptr + out_base + half + cols, (x2 * cos + x1 * sin).to(dtype), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sin_sign: float) -> torch.Tensor:
    batch, heads, seq, head_dim = x.shape
    out = torch.empty((batch, heads, seq, head_dim), dtype=x.dtype, device=x.device)
    rows = batch * heads * seq
    if rows:
        half = head_dim // 2
        _rope_kernel[(rows,)](
            x, out, cos, sin, heads, seq, half, *x.stride(), sin_sign,
            BLOCK=triton.next_power_of_2(half),
        )
    return out


class _TritonRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1.0), _rotate(k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return (
            None if grad_q is None else _rotate(grad_q, cos, sin, -1.0),
            None if grad_k is None else _rotate(grad_k, cos, sin, -1.0),
            None,
            None,
        )


def triton_apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k by the Triton kernel; same contract as `ling_kernels.rope.reference`."""
    return _TritonRope.apply(q, k, cos.float().contiguous(), sin.float().contiguous())
