"""Whole (unsharded) model and optimizer state of a model trained under FSDP2 and/or expert
parallelism, and the way back to this rank's shards: a checkpoint format that any world size,
mesh or device type can load.

Why not `migration.save_reshardable` (DCP)? Two reasons a trainer may prefer whole tensors:
expert-parallel experts are plain tensors that differ per rank (DCP would take them for
replicated copies and keep one), and a checkpoint that must also hold Hugging Face weights
needs whole tensors anyway. What it costs: one rank holds the whole state on the CPU while it
writes, fine for the models a CPU test or a single node trains, not for ones that only fit sharded.

- `full_model_state_dict(model)`: every tensor whole, on the CPU, under its fully-qualified name.
  DTensors (FSDP2/HSDP shards) are all-gathered; experts placed by `apply_expert_parallel`
  (each rank owns some, under their global names) are gathered from their owners.
- `full_optimizer_state_dict(model, optimizer)`: the optimizer's state keyed by parameter name
  (not by position, which differs per rank under expert parallel), every tensor whole and on
  the CPU; `param_groups` keep their hyperparameters and list their parameters by name.
- `local_optimizer_state_dict(model, optimizer, full)`: that state cut back to this rank's
  parameters and shards, as a plain `optimizer.load_state_dict` argument. No collectives: every
  rank reads the whole state and keeps its slice.
- `optimizer_state_by_name(model, optimizer, positional)`: a plain `optimizer.state_dict()` (by
  position, whole tensors, e.g. saved by a DDP run) keyed by name like `full_optimizer_state_dict`,
  so that a run whose optimizer holds the same parameters in the same order, sharded or not, can
  cut it with `local_optimizer_state_dict`. No collectives.

The first two are collectives (every rank calls them, in the same order); the whole state is
returned on `dst` only (None elsewhere). Without a process group they are plain copies.
Names come from `model.named_parameters()` of the unwrapped model (pass the module DDP wraps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ling_dist.expert_parallel import expert_parallel_parameters


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _whole_cpu(value: Any) -> Any:
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def _merged_order(orders: list[list[str]]) -> list[str]:
    """The unsharded model's key order from each rank's (each lacks the experts it does not own):
    a key missing so far goes right before the next key of its own rank's list already placed, so
    `experts.2` lands after rank 0's `experts.1` and before the layer's next module."""
    merged = list(orders[0])
    for order in orders[1:]:
        placed = set(merged)
        for i, name in enumerate(order):
            if name in placed:
                continue
            successor = next((later for later in order[i + 1:] if later in placed), None)
            merged.insert(merged.index(successor) if successor is not None else len(merged), name)
            placed.add(name)
    return merged


def _gather_expert_parts(local: Any, dst: int) -> list[Any] | None:
    """Every rank's `local` on `dst` (a list by rank), None elsewhere; `[local]` in one process."""
    if not _distributed():
        return [local]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(local, gathered, dst=dst)
    return gathered


def _expert_names(model: nn.Module) -> set[str]:
    experts = {id(p) for p in expert_parallel_parameters(model)}
    return {name for name, p in model.named_parameters() if id(p) in experts}


def full_model_state_dict(model: nn.Module, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The whole model on `dst`'s CPU (see the module docstring). Collective."""
    expert_names = _expert_names(model)
    whole: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    local_state = model.state_dict()
    for name, tensor in local_state.items():  # DTensors in the same order on every rank
        if name in expert_names:
            experts[name] = tensor.detach().cpu()
        else:
            whole[name] = _whole_cpu(tensor)
    on_dst = not _distributed() or dist.get_rank() == dst
    if not expert_names:  # expert parallel splits E/W >= 1 experts onto every rank, or none
        return whole if on_dst else None
    parts = _gather_expert_parts((experts, list(local_state)), dst)
    if not on_dst:
        return None
    for part, _ in parts:
        whole.update(part)  # replicated experts (HSDP) arrive once per replica: identical values
    return {name: whole[name] for name in _merged_order([order for _, order in parts])}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                              dst: int = 0) -> dict[str, Any] | None:
    """The optimizer's whole state by parameter name on `dst` (see the module docstring). Collective."""
    names = {id(p): name for name, p in model.named_parameters()}
    experts = {id(p) for p in expert_parallel_parameters(model)}
    state: dict[str, dict[str, Any]] = {}
    expert_state: dict[str, dict[str, Any]] = {}
    groups, expert_group_names = [], []
    for group in optimizer.param_groups:
        try:
            group_names = [names[id(p)] for p in group["params"]]
        except KeyError:
            raise ValueError("the optimizer holds a parameter that is not in model.named_parameters(); pass "
                             "the module the optimizer was built from (not a wrapper)") from None
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": group_names})
        expert_group_names.append([names[id(p)] for p in group["params"] if id(p) in experts])
        for p in group["params"]:
            entry = optimizer.state.get(p)
            if entry:  # DTensor shards step together: state on every rank or none
                target = expert_state if id(p) in experts else state
                target[names[id(p)]] = {key: _whole_cpu(value) for key, value in entry.items()}
    on_dst = not _distributed() or dist.get_rank() == dst
    if experts:  # on every rank or none (see full_model_state_dict)
        parts = _gather_expert_parts((expert_state, expert_group_names), dst)
        if on_dst:
            for part_state, part_groups in parts:
                state.update(part_state)
                for group, extra in zip(groups, part_groups):
                    group["params"] += [name for name in extra if name not in group["params"]]
    if not on_dst:
        return None
    return {"state": state, "param_groups": groups}


def _local_like(value: Any, param: torch.Tensor, name: str, key: str) -> Any:
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value  # scalars (Adam's `step`) stay as saved; load_state_dict places them
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"optimizer state {name!r}[{key!r}] has shape {list(value.shape)}, the parameter "
                         f"{list(param.shape)}; the checkpoint is from another model")
    if isinstance(param, DTensor):  # keep this rank's slice only; src_data_rank=None: no messages
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value.to(param.device)


def local_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                               full: dict[str, Any]) -> dict[str, Any]:
    """`full` (from `full_optimizer_state_dict`, any world size) cut to this rank's parameters and
    shards, for `optimizer.load_state_dict`. Raises ValueError when it does not fit the optimizer."""
    if not isinstance(full, dict) or not {"state", "param_groups"} <= full.keys():
        raise ValueError("expected a whole optimizer state with 'state' and 'param_groups' keyed by parameter "
                         "name (from full_optimizer_state_dict)")
    saved_groups = full["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"optimizer state has {len(saved_groups)} parameter groups, the optimizer "
                         f"{len(optimizer.param_groups)}")
    names = {id(p): name for name, p in model.named_parameters()}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for saved, group in zip(saved_groups, optimizer.param_groups):
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            if name not in saved["params"]:
                raise ValueError(f"parameter {name!r} is in another parameter group (or none) in the optimizer state")
            if name in full["state"]:
                state[index] = {key: _local_like(value, p, name, key) for key, value in full["state"][name].items()}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
                            positional: dict[str, Any]) -> dict[str, Any]:
    """`positional` (an `optimizer.state_dict()` with whole tensors, from an optimizer over the same
    parameters in the same groups and order as `optimizer`) keyed by parameter name, as
    `full_optimizer_state_dict` returns it. Not for expert parallel, whose optimizer lacks the
    experts other ranks own. Raises ValueError when the groups do not match."""
    if not isinstance(positional, dict) or not {"state", "param_groups"} <= positional.keys():
        raise ValueError("expected an optimizer.state_dict() with 'state' and 'param_groups'")
    saved_groups = positional["param_groups"]
    sizes = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in optimizer.param_groups]
    if sizes[0] != sizes[1]:
        raise ValueError(f"optimizer state has parameter groups of sizes {sizes[0]}, the optimizer {sizes[1]}")
    names = {id(p): name for name, p in model.named_parameters()}
    state: dict[str, dict[str, Any]] = {}
    groups = []
    for saved, group in zip(saved_groups, optimizer.param_groups):
        try:
            group_names = [names[id(p)] for p in group["params"]]
        except KeyError:
            raise ValueError("the optimizer holds a parameter that is not in model.named_parameters(); pass "
                             "the module the optimizer was built from (not a wrapper)") from None
        for index, name in zip(saved["params"], group_names):
            if index in positional["state"]:
                state[name] = dict(positional["state"][index])
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": group_names})
    return {"state": state, "param_groups": groups}
