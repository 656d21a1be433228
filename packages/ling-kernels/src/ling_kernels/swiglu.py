"""SwiGLU activation: `silu(gate) * up`, the elementwise core of every Ling MLP and expert.

Paths, chosen per call by `ling_kernels.dispatch`:

- `reference`: `F.silu(gate) * up` (autograd keeps gate, up and silu(gate) for the backward).
- CPU and any device without Triton (`fast`; `auto` on CPU): `_SwiGLUFunction`, a
  `torch.autograd.Function` that keeps only gate and up and recomputes silu(gate) in the
  backward (aten's fused `silu_backward`), so an expert's activation memory is two
  [tokens, ffn] tensors instead of three.
- CUDA with Triton importable: one Triton kernel each for forward and backward
  (`ling_kernels.swiglu_triton`).

The output and gradients have the inputs' dtype; bf16 math follows the same aten kernels
as the reference (fp32 inside silu, rounding between ops). The Triton kernels compute in fp32
throughout and round once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ling_kernels.dispatch import use_fast_path
from ling_kernels.triton_support import triton_importable

__all__ = ["swiglu", "reference"]


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The specification: silu(gate) * up, elementwise."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of the same shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"gate and up must have the same shape and dtype, got {tuple(gate.shape)} "
            f"{gate.dtype} and {tuple(up.shape)} {up.dtype}"
        )
    if not use_fast_path("swiglu", available=True):
        return reference(gate, up)
    if gate.is_cuda and triton_importable():
        from ling_kernels.swiglu_triton import triton_swiglu

        return triton_swiglu(gate, up)
    return _SwiGLUFunction.apply(gate, up)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        # aten's fused silu_backward: the same kernel autograd uses for F.silu.
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        grad_up = F.silu(gate).mul_(grad_out)
        return grad_gate, grad_up
