"""ling-kernels: training ops with a plain-torch reference (the specification) and fast paths.

Each op is one module with a `reference` and one public function that dispatches on device and
dtype; `LING_KERNELS=reference|fast|auto` (read on every call, default `auto`) forces a path
(see `ling_kernels.dispatch`):

- `fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, z_loss_weight=0.0,
  chunk_size=None) -> (loss, z_loss)`: lm head + cross-entropy in token chunks, never holding
  the [tokens, vocab] logits.
- `rms_norm(x, weight, eps=1e-6)`: a Triton kernel on CUDA, the reference elsewhere.
- `apply_rope(q, k, cos, sin) -> (q, k)`: rotate-half RoPE on queries and keys together.
- `swiglu(gate, up)`: silu(gate) * up, keeping only gate and up for the backward.
- MoE: `route(scores, top_k, norm_topk_prob) -> RouteResult`, `permute(x, expert_indices,
  num_experts) -> (rows grouped by expert, PermuteMap)`, `grouped_mm(x, weights,
  tokens_per_expert)`, `unpermute(expert_out, PermuteMap, expert_weights)`.

`ling_kernels.allocator.keep_freed_memory()` (not an op): tell glibc to keep freed memory in
the process, so CPU training steps do not page-fault on fresh gradients.

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
from ling_kernels.grouped_mm import grouped_mm
from ling_kernels.grouped_mm import reference as grouped_mm_reference
from ling_kernels.permute import PermuteMap, permute, unpermute
from ling_kernels.permute import reference_permute as permute_reference
from ling_kernels.permute import reference_unpermute as unpermute_reference
from ling_kernels.rms_norm import reference as rms_norm_reference
from ling_kernels.rms_norm import rms_norm
from ling_kernels.rope import apply_rope
from ling_kernels.rope import reference as apply_rope_reference
from ling_kernels.route import RouteResult, route
from ling_kernels.route import reference as route_reference
from ling_kernels.swiglu import reference as swiglu_reference
from ling_kernels.swiglu import swiglu

__all__ = [
    "PermuteMap",
    "RouteResult",
    "apply_rope",
    "apply_rope_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "grouped_mm",
    "grouped_mm_reference",
    "kernel_mode",
    "permute",
    "permute_reference",
    "rms_norm",
    "rms_norm_reference",
    "route",
    "route_reference",
    "swiglu",
    "swiglu_reference",
    "unpermute",
    "unpermute_reference",
]
