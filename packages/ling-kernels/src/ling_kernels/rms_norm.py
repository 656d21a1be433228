"""RMSNorm: `x / sqrt(mean(x**2, -1) + eps) * weight`, computed in fp32 and cast back to x's dtype.

Paths, chosen per call by `ling_kernels.dispatch`:

- `reference`: the specification in plain torch (fp32 math, cast back).
- CUDA with Triton importable: a Triton kernel (forward and backward) in a
  `torch.autograd.Function` (`ling_kernels.rms_norm_triton`).
- elsewhere: the reference. `torch.nn.functional.rms_norm` was measured as a CPU fast path and
  is no faster (fwd+bwd at [4096, 1024] on 2 CPU cores, best of 20: fp32 17.0-17.7 ms vs the
  reference's 17.3-17.8 ms, bf16 21.0-21.7 ms vs 19.1-19.8 ms;
  `scripts/measure_rms_norm.py`), so CPU has no fast path.
"""

from __future__ import annotations

import torch

from ling_kernels.dispatch import use_fast_path
from ling_kernels.triton_support import triton_importable

__all__ = ["rms_norm", "reference"]


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The specification: normalise over the last dimension in fp32, scale, cast to x.dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` with a [H] `weight`; output has x's dtype."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(
            f"weight must have shape [H] = {tuple(x.shape[-1:])} to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    triton_ok = x.is_cuda and triton_importable()
    if not use_fast_path("rms_norm", available=triton_ok):
        return reference(x, weight, eps)
    from ling_kernels.rms_norm_triton import triton_rms_norm

    return triton_rms_norm(x, weight, eps)

