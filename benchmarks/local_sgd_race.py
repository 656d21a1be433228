"""Spawned workers for `test_local_sgd.py`: a small regression model trained over gloo by
synchronous data parallel (torch DDP, all-reduce every step), DiLoCo, EDiT and A-EDiT.

A step's compute is simulated by sleeping `step_seconds` (twice that on the slow rank) on top
of a ~1 ms forward/backward, so the race measures the schedule (who waits for whom), not how
busy the shared 2-core machine happens to be. Every rank evaluates the synchronised model on
the same held-out set at each sync point; evaluation time is not counted as training time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

IN, HIDDEN = 32, 64


def make_student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 1))


def make_teacher() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(IN, 128), nn.Tanh(), nn.Linear(128, 1))


def batch(teacher: nn.Module, generator: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(rows, IN, generator=generator)
    with torch.no_grad():
        y = teacher(x) + 0.05 * torch.randn(rows, 1, generator=generator)
    return x, y


def join(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from ling_dist import init_distributed
    init_distributed(backend="gloo")


def build(method: str, model: nn.Module, inner: torch.optim.Optimizer, cfg: dict):
    """The Local SGD wrapper for `method` (None for DDP, which wraps the model instead)."""
    from ling_dist import AEDiT, DiLoCo, EDiT, PseudoGradientPenalty
    outer = dict(outer_lr=cfg["outer_lr"], outer_momentum=cfg["outer_momentum"])
    if method == "diloco":
        return DiLoCo(model, inner, sync_every=cfg["sync_every"], **outer)
    if method == "edit":
        return EDiT(model, inner, sync_every=cfg["sync_every"], penalty=PseudoGradientPenalty(), **outer)
    if method == "aedit":
        return AEDiT(model, inner, sync_seconds=cfg["sync_seconds"], **outer)
    raise ValueError(method)


def race(rank: int, world_size: int, port: int, out_dir: str, method: str, cfg: dict) -> None:
    join(rank, world_size, port)
    teacher = make_teacher()
    held_out = batch(teacher, torch.Generator().manual_seed(999), 1024)
    generator = torch.Generator().manual_seed(rank)
    model = make_student()
    step_seconds = cfg["step_seconds"] * (2 if rank == cfg["slow_rank"] else 1)
    if method == "ddp":
        trained = nn.parallel.DistributedDataParallel(model)
        inner = torch.optim.AdamW(model.parameters(), lr=cfg["inner_lr"])
        local_sgd = None
    else:
        trained = model
        inner = torch.optim.AdamW(model.parameters(), lr=cfg["inner_lr"])
        local_sgd = build(method, model, inner, cfg)

    def evaluate() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(held_out[0]), held_out[1]).item()

    curve = [(0.0, evaluate(), 0)]
    eval_seconds, steps, last_point = 0.0, 0, 0
    dist.barrier()
    start = time.perf_counter()
    while True:
        x, y = batch(teacher, generator, cfg["rows"])
        inner.zero_grad()
        nn.functional.mse_loss(trained(x), y).backward()
        time.sleep(step_seconds)
        if local_sgd is None:
            inner.step()
            point = (steps + 1) // cfg["sync_every"]
        else:
            local_sgd.step(tokens=cfg["rows"])
            point = local_sgd.sync_points
        steps += 1
        if point == last_point:
            continue
        last_point = point
        # A sync point: the same on every rank, so the stop decision below is a matched collective.
        paused = time.perf_counter()
        if local_sgd is not None:
            local_sgd.finish_sync()  # EDiT would finish in the next forward; evaluate the synced model
        elapsed = paused - start - eval_seconds
        curve.append((elapsed, evaluate(), steps))
        stop = torch.tensor([float(elapsed >= cfg["budget_seconds"])])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        eval_seconds += time.perf_counter() - paused
        if stop.item():
            break
    torch.save({"curve": curve, "steps": steps,
                "bytes": local_sgd.bytes_communicated if local_sgd else None}, Path(out_dir) / f"{method}{rank}.pt")
    dist.destroy_process_group()


def count_bytes(rank: int, world_size: int, port: int, out_dir: str, steps: int, sync_every: int) -> None:
    """Payload bytes per inner step: DDP (counted by a comm hook around the default all-reduce,
    so it is what DDP really sends) vs DiLoCo and EDiT (their `bytes_communicated`); the
    start-up broadcast of the parameters is left out of all three."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from ling_dist import DiLoCo, EDiT
    join(rank, world_size, port)
    teacher = make_teacher()
    result = {}
    for method in ("ddp", "diloco", "edit"):
        generator = torch.Generator().manual_seed(rank)
        model = make_student()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        counter = {"bytes": 0}
        if method == "ddp":
            trained = nn.parallel.DistributedDataParallel(model)

            def hook(state, bucket):
                state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(None, bucket)
            trained.register_comm_hook(counter, hook)
        else:
            trained = model
            wrapper = (DiLoCo if method == "diloco" else EDiT)(model, inner, sync_every=sync_every)
            at_start = wrapper.bytes_communicated
        for _ in range(steps):
            x, y = batch(teacher, generator, 16)
            inner.zero_grad()
            nn.functional.mse_loss(trained(x), y).backward()
            if method == "ddp":
                inner.step()
            else:
                wrapper.step(tokens=16)
        if method != "ddp":
            wrapper.finish_sync()
            counter["bytes"] = wrapper.bytes_communicated - at_start
        result[method] = counter["bytes"] / steps
    result["numel"] = sum(p.numel() for p in make_student().parameters())
    torch.save(result, Path(out_dir) / f"bytes{rank}.pt")
    dist.destroy_process_group()
