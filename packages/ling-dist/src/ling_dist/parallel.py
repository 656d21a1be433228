"""Data-parallel wrappers applied to a built model from outside: DDP, FSDP2, and the 2-D mesh.

Model code stays single-device (torchtitan's rule): construct the model, then call one of these
free functions, then build the optimizer over `model.parameters()` (FSDP2 turns parameters into
DTensors in place, so an optimizer built before would hold the old tensors).

Meshes: `data_parallel_mesh(replicate, shard)` is a 2-D `DeviceMesh` whose inner dimension
("shard") groups ranks that shard the parameters between them and whose outer dimension
("replicate") holds identical copies of those groups. `fully_shard` on that mesh is hybrid
sharding (HSDP): reduce-scatter inside a group, all-reduce across groups, which keeps the
frequent all-gathers on the fast intra-group links. A 1-D mesh (replicate=1) is plain FSDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

REPLICATE, SHARD = "replicate", "shard"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def data_parallel_mesh(replicate: int = 1, shard: int | None = None,
                       device_type: str | None = None) -> DeviceMesh | None:
    """A ("replicate", "shard") mesh over all ranks; `shard` defaults to world_size // replicate.

    Rank r sits at (r // shard, r % shard): consecutive ranks (one host, one fast link) shard
    together. `device_type` defaults to "cuda" under nccl and "cpu" otherwise. Without a
    process group (one process, see `init_distributed`) there is no mesh: None, which every
    wrapper here accepts and then leaves the model as it is.
    """
    if not _distributed():
        if (replicate, shard or 1) != (1, 1):
            raise ValueError(f"replicate={replicate} x shard={shard}: no process group, so only 1 x 1")
        return None
    world_size = dist.get_world_size()
    if shard is None:
        if replicate < 1 or world_size % replicate:
            raise ValueError(f"replicate={replicate}: expected a divisor of world_size={world_size}")
        shard = world_size // replicate
    if replicate < 1 or shard < 1 or replicate * shard != world_size:
        raise ValueError(f"replicate={replicate} x shard={shard}: expected the product to be world_size={world_size}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=(REPLICATE, SHARD))


def apply_ddp(model: nn.Module, *, process_group: dist.ProcessGroup | None = None,
              ignored_parameters: Iterable[nn.Parameter] = (), **ddp_kwargs) -> nn.Module:
    """Wrap `model` in `DistributedDataParallel`: gradients all-reduced (averaged) in buckets
    overlapped with backward. The returned wrapper is what you call; `.module` is your model.

    `ignored_parameters` are left out of the all-reduce: expert-parallel experts, whose ranks
    hold *different* experts under the same names (`apply_expert_parallel` syncs them itself).
    Parameters must already be on this rank's device (CUDA: `device_ids` is filled in).
    Without a process group (one process) `model` is returned unwrapped.
    """
    if not _distributed():
        return model
    ignored = {id(p) for p in ignored_parameters}
    if ignored:
        names = [name for name, p in model.named_parameters() if id(p) in ignored]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    device = next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    return DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh | None = None, *,
               units: Callable[[nn.Module], bool] | type[nn.Module] | Iterable[type[nn.Module]] = (),
               reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None,
               ignored_parameters: Iterable[nn.Parameter] = ()) -> nn.Module:
    """Shard `model` with FSDP2 `fully_shard`, in place; returns the same module.

    Each submodule selected by `units` (a predicate, or module classes, e.g. the transformer
    block) becomes one FSDP unit: its parameters are all-gathered just before its forward and
    freed after, so peak memory is one unit plus the shards. The root is sharded last and holds
    whatever no unit claimed (embeddings, final norm, head). On a 2-D mesh this is HSDP.
    `ignored_parameters` stay plain local tensors (expert-parallel experts). Without a process
    group (one process) the model is left as it is.
    """
    if not _distributed():
        return model
    if mesh is None:
        mesh = data_parallel_mesh()
    if isinstance(units, type) or not callable(units):  # a class is callable, but means "this type"
        unit_types = (units,) if isinstance(units, type) else tuple(units)
        units = lambda module: isinstance(module, unit_types)  # noqa: E731
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    ignored = set(ignored_parameters) or None
    selected = [m for m in model.modules() if m is not model and units(m)]
    for module in reversed(selected):  # innermost first: fully_shard must run bottom-up
        unit_ignored = {p for p in module.parameters() if ignored and p in ignored} or None
        if unit_ignored and len(unit_ignored) == len(list(module.parameters())):
            continue  # nothing left to shard (e.g. an expert kept local by expert parallelism)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy,
                    ignored_params=unit_ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy,
                ignored_params=ignored)
    return model
