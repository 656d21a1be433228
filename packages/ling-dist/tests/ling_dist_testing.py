"""Shared pieces of the ling-dist tests: a tiny model, per-rank data, the spawned worker, and a
single-process DiLoCo simulation written independently of `ling_dist.DiLoCo` (no ling_dist
import in `simulate_diloco`) so that the two can be compared."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

INNER_LR = 1e-2


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_inner(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=INNER_LR, weight_decay=0.01)


def rank_batches(seed: int, steps: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """`steps` regression batches for one worker; batch size alternates rows, rows + 1 so that
    tokens differ across steps as well as across workers. Returns (x, y, tokens) per step."""
    generator = torch.Generator().manual_seed(1000 + seed)
    batches = []
    for step in range(steps):
        n = rows + step % 2
        x = torch.randn(n, 4, generator=generator)
        y = x.sum(dim=1, keepdim=True).sin() + 0.1 * seed
        batches.append((x, y, n))
    return batches


def inner_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def simulate_diloco(workers: Sequence[list[tuple[torch.Tensor, torch.Tensor, int]]], *, sync_every: int,
                    outer_lr: float, outer_momentum: float, seed: int = 0) -> list[torch.Tensor]:
    """DiLoCo by the paper, one process: each worker's H inner steps run sequentially on its own
    copy, then the token-weighted average of (anchor - local) is the outer SGD's gradient.
    Returns the final anchor (what every worker holds after the last sync)."""
    model = make_model(seed)
    anchor = [p.detach().float().clone() for p in model.parameters()]
    outer = torch.optim.SGD(anchor, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)
    replicas = [copy.deepcopy(model) for _ in workers]
    inners = [make_inner(replica) for replica in replicas]
    steps = len(workers[0])
    assert steps % sync_every == 0
    for start in range(0, steps, sync_every):
        deltas, tokens = [], []
        for replica, inner, batches in zip(replicas, inners, workers):
            seen = 0
            for x, y, n in batches[start:start + sync_every]:
                inner_step(replica, inner, x, y)
                seen += n
            deltas.append([a - p.detach().float() for a, p in zip(anchor, replica.parameters())])
            tokens.append(seen)
        total = sum(tokens)
        for i, a in enumerate(anchor):
            a.grad = sum(delta[i] * (t / total) for delta, t in zip(deltas, tokens))
        outer.step()
        with torch.no_grad():
            for replica in replicas:
                for p, a in zip(replica.parameters(), anchor):
                    p.copy_(a)
    return [a.detach().clone() for a in anchor]


def diloco_worker(rank: int, world_size: int, port: int, out_dir: str, steps: int, sync_every: int,
                  outer_lr: float, outer_momentum: float, bucket_numel: int) -> None:
    """One spawned rank: joins through `init_distributed` from a torchrun-style environment,
    starts from its own (different) init so the broadcast from rank 0 is exercised, trains on
    its own data with its own batch size, and saves its final parameters. A small `bucket_numel`
    splits the pseudo-gradient over several all-reduces."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ling_dist import DiLoCo, init_distributed

    assert init_distributed(backend="gloo") == (rank, world_size, torch.device("cpu"))
    model = make_model(seed=rank)
    diloco = DiLoCo(model, make_inner(model), sync_every=sync_every, outer_lr=outer_lr,
                    outer_momentum=outer_momentum, bucket_numel=bucket_numel)
    for x, y, n in rank_batches(rank, steps, rows=2 + rank):
        diloco.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        diloco.step(tokens=n)
    torch.save({"params": [p.detach().clone() for p in model.parameters()],
                "bytes_communicated": diloco.bytes_communicated, "syncs": diloco.syncs},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
