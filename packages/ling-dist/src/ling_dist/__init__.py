"""ling-dist: distributed training for any `nn.Module` on torch.distributed.

Built so far: `init_distributed` (torchrun's environment -> process group, or a single process
without one) and `DiLoCo`, the synchronous Local SGD wrapper around an inner optimizer with
token-weighted pseudo-gradient averaging. The rest of issue 5 (EDiT, A-EDiT, DDP/FSDP2/expert
parallel wrappers, flash checkpoint) comes later. Imports torch only, never another ling package.
"""

from ling_dist.local_sgd import DiLoCo
from ling_dist.runtime import DistributedEnvError, init_distributed

__all__ = ["DiLoCo", "DistributedEnvError", "init_distributed"]

# The Local SGD family: one core (`LocalSGD`), a sync policy, a weighting; DiLoCo, EDiT, A-EDiT.
from ling_dist.edit import AEDiT, EDiT, default_units  # noqa: E402
from ling_dist.local_sgd import LocalSGD, SyncStats  # noqa: E402
from ling_dist.local_sgd_policy import EveryHSteps, EveryTSeconds, SyncPolicy  # noqa: E402
from ling_dist.local_sgd_weighting import PseudoGradientPenalty, SyncWeights, TokenWeighting  # noqa: E402

__all__ += ["AEDiT", "EDiT", "EveryHSteps", "EveryTSeconds", "LocalSGD", "PseudoGradientPenalty", "SyncPolicy",
            "SyncStats", "SyncWeights", "TokenWeighting", "default_units"]
