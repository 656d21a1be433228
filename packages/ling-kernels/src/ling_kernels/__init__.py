"""ling-kernels: training ops with a plain-torch reference (the specification) and fast paths.

Each op is one module with a `reference` and one public function that dispatches on device and
dtype; `LING_KERNELS=reference|fast|auto` (read on every call, default `auto`) forces a path
(see `ling_kernels.dispatch`). Built so far:

- `fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, z_loss_weight=0.0,
  chunk_size=None) -> (loss, z_loss)`: lm head + cross-entropy in token chunks, never holding
  the [tokens, vocab] logits.
- `rms_norm(x, weight, eps=1e-6)`: a Triton kernel on CUDA, `F.rms_norm` on CPU fp32.

The public functions shadow their modules as attributes of this package (as in torch); the
references are re-exported here as `<op>_reference`.
"""

from ling_kernels.dispatch import kernel_mode
from ling_kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
)
from ling_kernels.fused_linear_cross_entropy import (
    reference as fused_linear_cross_entropy_reference,
)
from ling_kernels.rms_norm import reference as rms_norm_reference
from ling_kernels.rms_norm import rms_norm

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "kernel_mode",
    "rms_norm",
    "rms_norm_reference",
]
