"""Spawned workers for the cluster-migration test: train under FSDP2 at one world size, write a
reshardable checkpoint with Local-SGD-like extra state, load it at another world size."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def extra_template(model: nn.Module) -> dict:
    """Zeros shaped like the extra state the writer saves (the loader fills them in place)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = {name: p.shape for name, p in make_model().named_parameters()}
    return {"anchor": {n: torch.zeros(shapes[n]) for n in names},
            "outer_momentum": {n: torch.zeros(shapes[n]) for n in names}, "syncs": 0}


def make_extra() -> dict:
    generator = torch.Generator().manual_seed(7)
    shapes = {name: p.shape for name, p in make_model().named_parameters()}
    return {"anchor": {n: torch.randn(s, generator=generator) for n, s in shapes.items()},
            "outer_momentum": {n: torch.randn(s, generator=generator) for n, s in shapes.items()}, "syncs": 3}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state as full (unsharded) tensors keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return {"model": {k: v.clone() for k, v in model_state.items()},
            "optimizer": {name: {k: v.clone() for k, v in s.items()} for name, s in optimizer_state["state"].items()}}


def migration_worker(rank: int, world_size: int, port: int, out_dir: str, load_from: str | None,
                     save_to: str) -> None:
    """Build the model sharded over `world_size` ranks; either train 2 steps (`load_from` None) or
    load `load_from`; record the full state (rank 0) to `save_to`.pt and write `save_to` reshardable."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ling_dist import apply_fsdp, init_distributed
    from ling_dist.migration import load_resharded, save_reshardable

    init_distributed(backend="gloo")
    out = Path(out_dir)
    model = make_model()
    apply_fsdp(model, units=[nn.Linear])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if load_from is None:
        for step in range(2):
            generator = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(8, 4, generator=generator)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), x.sum(-1, keepdim=True).sin()).backward()
            optimizer.step()
        extra = make_extra()
    else:
        extra = load_resharded(out / load_from, model, optimizer, extra=extra_template(model))
    state = full_state(model, optimizer)
    if rank == 0:
        torch.save({**state, "extra": extra}, out / f"{save_to}.pt")
    save_reshardable(out / save_to, model, optimizer, extra=extra)
    dist.destroy_process_group()


def full_state_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """FSDP2 + expert parallel on parallel_testing's tiny MoE, AdamW, two steps; then the whole
    state (rank 0 saves it) and every rank's local pieces, and the whole state cut back to shards
    on a freshly wrapped model (saved per rank, for comparison with the trained shards)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from parallel_testing import Block, batch, loss_fn
    from parallel_testing import make_model as make_moe
    from torch.distributed.tensor import DTensor

    from ling_dist import (apply_expert_parallel, apply_fsdp, expert_parallel_parameters, full_model_state_dict,
                           full_optimizer_state_dict, init_distributed, local_optimizer_state_dict)

    def wrapped() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = make_moe()
        apply_expert_parallel(model)
        apply_fsdp(model, units=[Block], ignored_parameters=expert_parallel_parameters(model))
        decay = [p for n, p in model.named_parameters() if "bias" not in n]
        no_decay = [p for n, p in model.named_parameters() if "bias" in n]
        return model, torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)

    def local(value):
        return value.to_local().clone() if isinstance(value, DTensor) else value.clone()

    def local_state(model, optimizer) -> dict:
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: {k: local(v) for k, v in s.items()} for p, s in optimizer.state.items()}

    init_distributed(backend="gloo")
    model, optimizer = wrapped()
    for step in range(2):
        optimizer.zero_grad()
        loss_fn(model, *batch(rank, step)).backward()
        optimizer.step()
    weights = full_model_state_dict(model)
    whole = full_optimizer_state_dict(model, optimizer)
    assert (weights is None) == (whole is None) == (rank != 0)
    fresh_model, fresh_optimizer = wrapped()
    reference = whole if rank == 0 else None
    shared = [reference]
    dist.broadcast_object_list(shared, src=0)
    fresh_optimizer.load_state_dict(local_optimizer_state_dict(fresh_model, fresh_optimizer, shared[0]))
    out = Path(out_dir)
    torch.save({"trained": local_state(model, optimizer), "loaded": local_state(fresh_model, fresh_optimizer),
                "model": {n: local(t) for n, t in model.state_dict().items()}}, out / f"full-rank{rank}.pt")
    if rank == 0:
        torch.save({"model": weights, "optimizer": whole}, out / "full.pt")
    dist.destroy_process_group()
