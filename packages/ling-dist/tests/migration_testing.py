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
