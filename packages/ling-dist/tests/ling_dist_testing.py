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


def run_scenario(rank: int, world_size: int, port: int, out_dir: str, scenario: str, kwargs: dict) -> None:
    """Spawned entry point for the EDiT/A-EDiT tests: join a gloo group, run the module-level
    function named `scenario` with (rank, world_size, **kwargs), save what it returns."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ling_dist import init_distributed

    init_distributed(backend="gloo")
    try:
        result = globals()[scenario](rank, world_size, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(scenario: str, world_size: int, out_dir: Path, **kwargs) -> list:
    """Run `scenario` on `world_size` gloo ranks; return each rank's result."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(run_scenario, nprocs=world_size, start_method="spawn",
                       args=(world_size, port, str(out_dir), scenario, kwargs))
    # weights_only=False: the results hold SyncStats dataclasses, written by our own workers.
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def make_deep_model(seed: int) -> nn.Module:
    """Five units with parameters (for layer-wise sync), small enough for milliseconds per step."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
                         nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def dp_sgd_reference(world_size: int, steps: int, lr: float) -> list[torch.Tensor]:
    """Synchronous data-parallel SGD in one process: each step, one SGD step on the mean loss
    over all ranks' rows (what DDP computes when every rank's rows are weighted by count)."""
    model = make_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    per_rank = [rank_batches(r, steps, rows=2 + r) for r in range(world_size)]
    for step in range(steps):
        x = torch.cat([per_rank[r][step][0] for r in range(world_size)])
        y = torch.cat([per_rank[r][step][1] for r in range(world_size)])
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return params_of(model)


def diloco_as_data_parallel(rank: int, world_size: int, steps: int, lr: float) -> dict:
    """DiLoCo with H=1, outer lr 1, no momentum and a plain SGD inner optimizer."""
    from ling_dist import DiLoCo
    model = make_model(0)
    diloco = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=lr), sync_every=1, outer_lr=1.0,
                    outer_momentum=0.0)
    for x, y, n in rank_batches(rank, steps, rows=2 + rank):
        diloco.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        diloco.step(tokens=n)
    return {"params": params_of(model)}


def edit_layerwise_vs_whole(rank: int, world_size: int, steps: int, sync_every: int) -> dict:
    """The same data through EDiT with layer-wise sync and with whole-model sync, side by side
    in one process group; parameters are captured after the forward that completes each sync."""
    from ling_dist.edit import EDiT
    runs = {}
    for layer_wise in (True, False):
        model = make_deep_model(seed=rank)
        edit = EDiT(model, make_inner(model), sync_every=sync_every, layer_wise=layer_wise, bucket_numel=100)
        batches = rank_batches(rank, steps + 1, rows=2 + rank)
        after_sync, stats = [], []
        for step, (x, y, n) in enumerate(batches):
            edit.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if step and step % sync_every == 0:  # this forward completed the sync started by the last step
                after_sync.append(params_of(model))
                stats.append(edit.last_sync)
            if step == steps:
                break
            loss.backward()
            edit.step(tokens=n)
        runs[layer_wise] = {"after_sync": after_sync, "anchor": [a.clone() for a in edit.anchor], "stats": stats,
                            "bytes": edit.bytes_communicated, "hooks": len(edit._hooks)}
    return runs


def edit_with_outlier(rank: int, world_size: int, warmup_syncs: int, outlier_rank: int, scale: float) -> dict:
    """`warmup_syncs` healthy syncs of two steps each, then `outlier_rank` blows its local update
    up by `scale` before one more sync (syncs are explicit, `sync_every` never triggers). Outer
    lr 1 and no momentum make the new anchor the weighted average of the workers' parameters;
    equal tokens and no norm weighting make it the plain mean of the included workers."""
    from ling_dist import PseudoGradientPenalty
    from ling_dist.edit import EDiT
    model = make_deep_model(seed=0)
    penalty = PseudoGradientPenalty(ewma_alpha=0.3, warmup_syncs=warmup_syncs, temperature=None, clip_norm=None)
    edit = EDiT(model, make_inner(model), sync_every=10**9, penalty=penalty, outer_lr=1.0, outer_momentum=0.0)
    batches = rank_batches(rank, 2 * (warmup_syncs + 1), rows=4)
    excluded_during_warmup = []
    for sync in range(warmup_syncs + 1):
        for x, y, _ in batches[2 * sync:2 * sync + 2]:
            edit.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            edit.step(tokens=4)
        if sync == warmup_syncs:
            break
        edit.sync()
        excluded_during_warmup += edit.last_sync.excluded
    if rank == outlier_rank:
        with torch.no_grad():
            for p, a in zip(edit.params, edit.anchor):
                p.copy_(a + scale * (p - a))
    before = params_of(model)
    edit.sync()
    return {"before": before, "after": params_of(model), "stats": edit.last_sync,
            "excluded_during_warmup": excluded_during_warmup}


def aedit_with_straggler(rank: int, world_size: int, slow_rank: int, step_seconds: float, sync_seconds: float,
                         global_steps: int) -> dict:
    """A-EDiT for a budget of `global_steps` inner steps over all ranks; every step sleeps
    `step_seconds`, twice as long on `slow_rank`."""
    import time

    from ling_dist.edit import AEDiT
    model = make_deep_model(seed=0)
    aedit = AEDiT(model, make_inner(model), sync_seconds=sync_seconds)
    generator = torch.Generator().manual_seed(rank)
    losses, reports = [], []
    while aedit.global_inner_steps < global_steps:
        x = torch.randn(8, 4, generator=generator)
        y = x.sum(dim=1, keepdim=True).sin()
        aedit.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        time.sleep(step_seconds * (2 if rank == slow_rank else 1))
        syncs_before = aedit.sync_points
        aedit.step(tokens=8)
        losses.append(loss.item())
        if aedit.sync_points != syncs_before:
            reports.append(aedit.last_sync)
    aedit.sync()
    return {"losses": losses, "reports": reports, "inner_steps": aedit.inner_steps, "params": params_of(model)}


def edit_inside_fsdp2_groups(rank: int, world_size: int, steps: int, sync_every: int) -> dict:
    """2 workers x 2 shards on a (replicate, shard) mesh: each worker is an FSDP2 group, EDiT
    runs across the groups on local shards. Alongside, the same workers unsharded: each rank
    of a group trains on the group's concatenated batches (what FSDP's averaged gradient is
    with equal batch sizes) and EDiT runs over the replicate group alone."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ling_dist.edit import EDiT
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    worker = rank // 2
    group_batches = [rank_batches(r, steps, rows=4) for r in (2 * worker, 2 * worker + 1)]
    results = {}
    for sharded in (True, False):
        model = make_deep_model(seed=0)
        if sharded:
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh["shard"])
            fully_shard(model, mesh=mesh["shard"])
        edit = EDiT(model, make_inner(model), sync_every=sync_every,
                    units=[m for m in model if isinstance(m, nn.Linear)], process_group=mesh.get_group("replicate"),
                    shard_group=mesh.get_group("shard") if sharded else None)
        for step in range(steps):
            if sharded:
                x, y, n = group_batches[rank % 2][step]
            else:
                x = torch.cat([b[step][0] for b in group_batches])
                y = torch.cat([b[step][1] for b in group_batches])
            edit.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            edit.step(tokens=x.shape[0])
        edit.finish_sync()
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]
        results[sharded] = {"params": full, "stats": edit.last_sync, "bytes": edit.bytes_communicated,
                            "local_numel": sum(a.numel() for a in edit.anchor)}
    return results
