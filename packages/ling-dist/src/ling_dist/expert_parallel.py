"""Expert parallelism: each rank of an expert-parallel group holds E / W of an MoE layer's
experts; tokens travel to the rank of their expert and back with two all_to_all_single calls.

The contract (any MoE module, no ling-core import): the module has
- `experts`: an `nn.ModuleList` of E experts, each mapping `[n, hidden] -> [n, hidden]`;
- `routed_experts(x, routing) -> [tokens, hidden]`, which its forward calls with `x` of shape
  `[tokens, hidden]` and a `routing` carrying `expert_indices` (`[tokens, k]` int64, distinct
  per token) and `expert_weights` (`[tokens, k]`); the result is
  `sum_j expert_weights[t, j] * experts[expert_indices[t, j]](x[t])`, weighted in fp32.
`apply_expert_parallel` replaces `routed_experts` on each such module (found by that shape)
with the dispatch below and drops the experts this rank does not own: `experts[i]` becomes
None, so the owned ones keep their global names (`...experts.5.w1.weight`) in state dicts.

Gradients. With DDP/FSDP semantics every rank's loss is its local mean and the job's loss is
the mean over ranks. A rank's expert gradient arrives already summed over the tokens every EP
peer sent it, so it is divided by the EP group size; on a 2-D mesh the experts are also
replicated across the "replicate" dimension, and the gradient is summed over it and divided by
its size. Both happen in a hook on the incoming gradient (before accumulation, so gradient
accumulation stays correct). Exclude `expert_parallel_parameters(model)` from DDP/FSDP
(`ignored_parameters=`), which would otherwise average different experts with each other.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ling_dist import collectives


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse exchange (the splits swapped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        return collectives.all_to_all_single(out, x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


@dataclass
class _ExpertShard:
    group: dist.ProcessGroup
    size: int  # W, ranks in the expert-parallel group
    rank: int  # this rank's index in it
    num_experts: int  # E, across the group
    replicate_group: dist.ProcessGroup | None
    replicate_size: int

    @property
    def per_rank(self) -> int:
        return self.num_experts // self.size


def _dispatch_routed_experts(module: nn.Module, x: torch.Tensor, routing) -> torch.Tensor:
    shard: _ExpertShard = module._ling_expert_shard
    size, per_rank = shard.size, shard.per_rank
    local_experts = [module.experts[shard.rank * per_rank + i] for i in range(per_rank)]
    k = routing.expert_indices.shape[-1]
    flat_experts = routing.expert_indices.reshape(-1)
    slot_order = flat_experts.argsort(stable=True)  # slots grouped by expert, hence by owner rank
    token_of_slot = slot_order // k
    send_counts = torch.bincount(flat_experts, minlength=shard.num_experts)  # [E]
    recv_counts = torch.empty_like(send_counts)  # [W * per_rank]: per source rank, per local expert
    collectives.all_to_all_single(recv_counts, send_counts, None, None, shard.group)
    send_splits = send_counts.view(size, per_rank).sum(1).tolist()
    recv_counts = recv_counts.view(size, per_rank)
    recv_splits = recv_counts.sum(1).tolist()

    received = _AllToAll.apply(x.index_select(0, token_of_slot), recv_splits, send_splits, shard.group)
    # Rows arrive ordered (source rank, local expert); regroup by local expert to run each once.
    local_expert_of_row = torch.arange(per_rank, device=x.device).repeat(size).repeat_interleave(
        recv_counts.reshape(-1).to(x.device))
    by_expert = local_expert_of_row.argsort(stable=True)
    segments = received.index_select(0, by_expert).split(recv_counts.sum(0).tolist())
    # Every local expert runs, even on zero rows, so every rank's experts get a gradient and
    # the gradient hooks (collectives on the replicate group) fire on all ranks alike.
    expert_out = torch.cat([expert(segment) for expert, segment in zip(local_experts, segments)])
    returned = _AllToAll.apply(expert_out.index_select(0, by_expert.argsort()), send_splits, recv_splits,
                               shard.group)
    slot_weights = routing.expert_weights.reshape(-1)[slot_order].unsqueeze(-1)
    weighted = (returned.float() * slot_weights).to(x.dtype)
    return torch.zeros_like(x).index_add(0, token_of_slot, weighted)


def _is_moe(module: nn.Module) -> bool:
    return isinstance(getattr(module, "experts", None), nn.ModuleList) and callable(
        getattr(module, "routed_experts", None))


def _groups(mesh: DeviceMesh | None) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    if mesh is None:
        return dist.group.WORLD, None
    if mesh.ndim == 1:
        return mesh.get_group(0), None
    if mesh.ndim == 2:
        return mesh.get_group(1), mesh.get_group(0)
    raise ValueError(f"mesh with {mesh.ndim} dimensions: expected 1 (expert) or 2 (replicate, expert)")


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh | None = None) -> list[nn.Module]:
    """Split the experts of every MoE module in `model` (see the module docstring) across ranks.

    `mesh`: None = all ranks form one expert-parallel group; a 1-D mesh = that group; a 2-D
    mesh (e.g. `data_parallel_mesh(replicate, shard)`) = experts split along the inner dimension
    and replicated along the outer one. Rank i of the group owns experts
    `[i * E / W, (i + 1) * E / W)`; E must divide evenly. Call on a model whose experts are
    initialised identically on every rank (same seed), before building the optimizer.
    Returns the modules converted. Without a process group (one process) every expert is local
    already: nothing changes and the result is [].
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    group, replicate_group = _groups(mesh)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    replicate_size = dist.get_world_size(replicate_group) if replicate_group is not None else 1
    converted = []
    for name, module in model.named_modules():
        if not _is_moe(module) or hasattr(module, "_ling_expert_shard"):
            continue
        num_experts = len(module.experts)
        if num_experts % size:
            raise ValueError(f"{name or 'model'}: {num_experts} experts cannot be split evenly over "
                             f"{size} expert-parallel ranks")
        shard = _ExpertShard(group, size, rank, num_experts, replicate_group, replicate_size)
        owned = range(rank * shard.per_rank, (rank + 1) * shard.per_rank)
        for index in range(num_experts):
            if index not in owned:
                module.experts[index] = None
        for index in owned:
            for param in module.experts[index].parameters():
                param._ling_expert_parallel = True
                param.register_hook(_gradient_hook(shard))
        module._ling_expert_shard = shard
        module.routed_experts = types.MethodType(_dispatch_routed_experts, module)
        converted.append(module)
    if not converted:
        raise ValueError("no MoE module found: expected a module with an `experts` nn.ModuleList and a "
                         "`routed_experts(x, routing)` method")
    return converted


def _gradient_hook(shard: _ExpertShard):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad / shard.size
        if shard.replicate_group is not None and shard.replicate_size > 1:
            grad = collectives.all_reduce(grad.contiguous(), dist.ReduceOp.SUM, shard.replicate_group)
            grad = grad / shard.replicate_size
        return grad
    return hook


def expert_parallel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert parameters `apply_expert_parallel` placed on this rank (exclude them from DDP/FSDP)."""
    return [p for p in model.parameters() if getattr(p, "_ling_expert_parallel", False)]
