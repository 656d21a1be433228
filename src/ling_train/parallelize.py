"""Apply ling-dist's parallel wrappers to a built `LingForCausalLM` (the adapter between ling-core's
model and ling-dist's model-agnostic wrappers; the CLI flags that select it come later).

The model must be built and initialised *before* this (`ling_core.build_model(config, seed=...)`,
same seed on every rank): expert parallelism keeps each rank's share of identically initialised
experts, and FSDP2 shards the parameters each rank already holds. Build the optimizer after.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ling_core import LingForCausalLM
from ling_core.model import DecoderLayer
from ling_dist import apply_ddp, apply_expert_parallel, apply_fsdp, data_parallel_mesh, expert_parallel_parameters


def parallelize(model: LingForCausalLM, *, data_parallel: Literal["ddp", "fsdp"] = "fsdp",
                expert_parallel: bool = False, replicate: int = 1) -> nn.Module:
    """Return the module to train: DDP (a wrapper) or FSDP2 (the model itself, sharded per
    decoder layer; with `replicate > 1`, HSDP: shard inside groups of world_size / replicate
    consecutive ranks, replicate across them). `expert_parallel` splits every MoE layer's experts
    over the ranks of a shard group (all ranks when replicate is 1); the experts are then left out
    of DDP/FSDP, which would average different experts together."""
    if data_parallel not in ("ddp", "fsdp"):
        raise ValueError(f"data_parallel={data_parallel!r}: expected 'ddp' or 'fsdp'")
    mesh = data_parallel_mesh(replicate)
    ignored: list[nn.Parameter] = []
    if expert_parallel:
        apply_expert_parallel(model, mesh)
        ignored = expert_parallel_parameters(model)
    if data_parallel == "ddp":
        if replicate != 1:
            raise ValueError(f"replicate={replicate} applies to FSDP (HSDP); DDP replicates everywhere")
        return apply_ddp(model, ignored_parameters=ignored)
    return apply_fsdp(model, mesh, units=[DecoderLayer], ignored_parameters=ignored)
