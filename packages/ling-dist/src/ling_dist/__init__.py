"""ling-dist: distributed training for any `nn.Module` on torch.distributed.

`init_distributed` (torchrun's environment -> process group, or a single process without one);
the Local SGD family (DiLoCo, EDiT, A-EDiT) as wrappers around an inner optimizer; DDP / FSDP2 /
expert-parallel wrappers on a 2-D mesh; flash checkpoint, migration, straggler detection.
Imports torch only, never another ling package.
"""

from ling_dist.local_sgd import DiLoCo
from ling_dist.runtime import DistributedEnvError, init_distributed

__all__ = ["DiLoCo", "DistributedEnvError", "init_distributed"]

# Parallel wrappers, expert parallel, staged collectives (issue 5, items 1 and 3).
from ling_dist.expert_parallel import apply_expert_parallel, expert_parallel_parameters  # noqa: E402
from ling_dist.flash_checkpoint import CheckpointError, FlashCheckpointer, latest_complete  # noqa: E402
from ling_dist.full_state import (full_model_state_dict, full_optimizer_state_dict,  # noqa: E402
                                  local_optimizer_state_dict, optimizer_state_by_name)
from ling_dist.migration import load_resharded, local_sgd_state_for_world_size, save_reshardable  # noqa: E402
from ling_dist.parallel import apply_ddp, apply_fsdp, data_parallel_mesh  # noqa: E402
from ling_dist.straggler import StragglerMonitor, StragglerRecord  # noqa: E402

__all__ += ["CheckpointError", "FlashCheckpointer", "StragglerMonitor", "StragglerRecord", "apply_ddp",
            "apply_expert_parallel", "apply_fsdp", "data_parallel_mesh", "expert_parallel_parameters",
            "full_model_state_dict", "full_optimizer_state_dict", "latest_complete", "load_resharded",
            "local_optimizer_state_dict", "local_sgd_state_for_world_size", "optimizer_state_by_name",
            "save_reshardable"]
# The Local SGD family: one core (`LocalSGD`), a sync policy, a weighting; DiLoCo, EDiT, A-EDiT.
from ling_dist.edit import AEDiT, EDiT, default_units  # noqa: E402
from ling_dist.local_sgd import LocalSGD, SyncStats  # noqa: E402
from ling_dist.local_sgd_policy import EveryHSteps, EveryTSeconds, SyncPolicy  # noqa: E402
from ling_dist.local_sgd_weighting import PseudoGradientPenalty, SyncWeights, TokenWeighting  # noqa: E402

__all__ += ["AEDiT", "EDiT", "EveryHSteps", "EveryTSeconds", "LocalSGD", "PseudoGradientPenalty", "SyncPolicy",
            "SyncStats", "SyncWeights", "TokenWeighting", "default_units"]
