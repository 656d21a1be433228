"""Rotary position embedding (HF rotate-half layout) applied to queries and keys together.

`apply_rope(q, k, cos, sin)` with q [batch, q_heads, seq, head_dim], k [batch, kv_heads, seq,
head_dim] and cos/sin [seq, head_dim] (angles repeated over the two halves, as HF builds them)
returns `(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)` where
`rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])`, in fp32, cast back to the input dtype.

Paths, chosen per call by `ling_kernels.dispatch`:

- `reference`: the formula above in plain torch; autograd keeps fp32 copies of q and k.
- CPU and any device without Triton (`fast`; `auto` on CPU): `_RopeFunction`, a
  `torch.autograd.Function` whose backward is the inverse rotation (rope is orthogonal:
  grad_x = grad * cos + rotate_half^T(grad * sin)), so it keeps only cos and sin, no activation.
- CUDA with Triton importable: a Triton kernel for forward and backward
  (`ling_kernels.rope_triton`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ling_kernels.dispatch import use_fast_path
from ling_kernels.triton_support import triton_importable

__all__ = ["apply_rope", "reference"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    """The transpose (= inverse) of `_rotate_half`: cat(x[..., D/2:], -x[..., :D/2])."""
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], -x[..., :half]], dim=-1)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


def reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: rotate-half RoPE on q and on k, fp32 math, cast back."""
    cos, sin = cos.float(), sin.float()
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, S, D] and k [B, Hkv, S, D] by the angles in cos/sin [S, D]."""
    _check(q, k, cos, sin)
    if not use_fast_path("apply_rope", available=True):
        return reference(q, k, cos, sin)
    if q.is_cuda and triton_importable():
        from ling_kernels.rope_triton import triton_apply_rope

        return triton_apply_rope(q, k, cos, sin)
    return _RopeFunction.apply(q, k, cos.float(), sin.float())


def _check(q, k, cos, sin) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be [batch, heads, seq, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    batch, _, seq, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"k {tuple(k.shape)} must share batch, seq and head_dim with q {tuple(q.shape)}"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    if cos.shape != (seq, head_dim) or sin.shape != (seq, head_dim):
        raise ValueError(
            f"cos and sin must be [seq, head_dim] = {(seq, head_dim)}, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_one(q, cos, sin), _rope_one(k, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors

        def inverse(grad):
            if grad is None:
                return None
            grad32 = grad.float()
            return (grad32 * cos + _rotate_half_transposed(grad32 * sin)).to(grad.dtype)

        return inverse(grad_q), inverse(grad_k), None, None
