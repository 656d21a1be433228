"""A tiny MoE model following ling_dist.expert_parallel's contract, and the spawned worker that
trains it under DDP / FSDP2 / expert parallel / HSDP + EP, for comparison with one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

HIDDEN, NUM_EXPERTS, TOP_K, ROWS_PER_RANK, LR = 8, 4, 2, 6, 0.1


class Routing(NamedTuple):
    expert_indices: torch.Tensor
    expert_weights: torch.Tensor


class TinyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, NUM_EXPERTS, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, 16), nn.Tanh(), nn.Linear(16, HIDDEN)) for _ in range(NUM_EXPERTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(flat).float().softmax(-1).topk(TOP_K, dim=-1)
        return self.routed_experts(flat, Routing(indices, weights)).reshape(x.shape)

    def routed_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The plain reference: every token through each of its k experts, one at a time. An
        expert runs even on zero rows, so that it always has a (zero) gradient."""
        out = torch.zeros_like(x)
        for j in range(routing.expert_indices.shape[1]):
            for e, expert in enumerate(self.experts):
                mask = routing.expert_indices[:, j] == e
                weight = routing.expert_weights[mask, j].unsqueeze(-1)
                out = out.index_put((mask,), (expert(x[mask]).float() * weight).to(x.dtype), accumulate=True)
        return out


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.moe = TinyMoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + torch.tanh(self.mix(x))
        return h + self.moe(h)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make_model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(ROWS_PER_RANK, 3, 4, generator=generator)
    return x, x.sum(-1, keepdim=True).sin()


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def reference(world_size: int) -> dict:
    """One process on every rank's rows at once: loss and gradients of step 0, loss at step 1
    after one SGD step (the mean over ranks of equal-sized batches is the mean over all rows)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(2):
        xs, ys = zip(*(batch(r, step) for r in range(world_size)))
        optimizer.zero_grad()
        loss = loss_fn(model, torch.cat(xs), torch.cat(ys))
        loss.backward()
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def parallel_worker(rank: int, world_size: int, port: int, out_dir: str, modes: list[str]) -> None:
    """One rank running each of `modes` (ddp | fsdp | ep | hsdp_ep) in turn on a fresh model, in
    one process group (process start-up dominates these tests)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ling_dist import init_distributed

    # The mixed CPU+CUDA setting: one gloo group, each rank on its own device (CPU here).
    assert init_distributed(device="auto") == (rank, world_size, torch.device("cpu"))
    assert dist.get_backend() == "gloo"
    for mode in modes:
        if mode == "staged":
            _staged_collectives(rank, world_size, out_dir)
        elif mode == "ep_random":
            _expert_parallel_random_cases(rank, world_size, out_dir)
        elif mode == "flash_fsdp":
            _flash_snapshot_of_fsdp(rank, out_dir)
        else:
            _train_two_steps(rank, world_size, out_dir, mode)
    dist.destroy_process_group()


def _staged_collectives(rank: int, world_size: int, out_dir: str) -> None:
    """The host-staging path of ling_dist.collectives, forced on CPU tensors (a CUDA rank takes
    the same path with a device copy): results must equal the direct collectives'."""
    from ling_dist import collectives

    results = {}
    for stage in (False, True):
        summed = collectives.all_reduce(torch.arange(5.0) * (rank + 1), group=None, stage=stage)
        rows = torch.arange(3 * world_size, dtype=torch.float32).reshape(-1, 1) + 100 * rank
        received = torch.empty(3 * world_size, 1)
        collectives.all_to_all_single(received, rows, None, None, stage=stage)
        results[stage] = (summed, received)
    torch.save(results, Path(out_dir) / f"staged-rank{rank}.pt")


def _train_two_steps(rank: int, world_size: int, out_dir: str, mode: str) -> None:
    """Saves this rank's two losses and the step-0 gradients it can see (full tensors for
    sharded ones, only its own experts under expert parallel)."""
    from ling_dist import apply_ddp, apply_expert_parallel, apply_fsdp, data_parallel_mesh, expert_parallel_parameters

    model = make_model()
    module = model
    if mode == "ddp":
        model = apply_ddp(module)
    elif mode == "fsdp":
        apply_fsdp(module, units=Block)  # a single class works as well as a list
    elif mode == "ep":
        apply_expert_parallel(module)
        model = apply_ddp(module, ignored_parameters=expert_parallel_parameters(module))
    elif mode == "hsdp_ep":
        mesh = data_parallel_mesh(replicate=2, shard=world_size // 2)
        apply_expert_parallel(module, mesh)
        # Nested units (every Linear inside each Block); the experts' Linears hold only ignored
        # parameters and are skipped.
        apply_fsdp(module, mesh, units=[Block, nn.Linear], ignored_parameters=expert_parallel_parameters(module))
    else:
        raise ValueError(mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(2):
        optimizer.zero_grad()
        loss = loss_fn(model, *batch(rank, step))
        loss.backward()
        if step == 0:
            grads = {name: _full(p.grad).clone() for name, p in module.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    torch.save({"losses": losses, "grads": grads}, Path(out_dir) / f"{mode}-rank{rank}.pt")


def straggler_worker(rank: int, world_size: int, port: int, out_dir: str, slow_rank: int, steps: int) -> None:
    """Every step sleeps 20 ms; `slow_rank` sleeps 60 ms (3x). Saves the monitor's records and log."""
    import logging
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ling_dist import StragglerMonitor, init_distributed

    records_seen, log_lines = [], []
    handler = logging.Handler()
    handler.emit = lambda record: log_lines.append(record.getMessage())
    logging.getLogger("ling_dist.straggler").addHandler(handler)
    init_distributed(backend="gloo")
    monitor = StragglerMonitor(interval=3, factor=1.5, patience=2)
    for _ in range(steps):
        start = time.perf_counter()
        time.sleep(0.06 if rank == slow_rank else 0.02)
        records_seen.append([record.as_metrics() for record in monitor.record(time.perf_counter() - start)])
    torch.save({"records": records_seen, "log": log_lines}, Path(out_dir) / f"straggler-rank{rank}.pt")
    dist.destroy_process_group()


def _expert_parallel_random_cases(rank: int, world_size: int, out_dir: str, cases: int = 12) -> None:
    """The expert-parallel dispatch against TinyMoE.routed_experts on random routings drawn from a
    seeded generator (hypothesis cannot drive several processes in lockstep): per-rank token
    counts 0-9 (a rank may send nothing), k of 1-3, and in some cases every token routed to the
    same few experts (others get zero rows). Compares this rank's outputs, input and routing-weight
    gradients, and the gradients of the experts it owns (reference: the sum over ranks of each
    rank's reference gradient, / world_size as the hook does). Saves the largest differences."""
    import copy

    import torch.distributed as dist

    from ling_dist import apply_expert_parallel

    worst = {"out": 0.0, "x_grad": 0.0, "weight_grad": 0.0, "expert_grad": 0.0}
    for case in range(cases):
        generator = torch.Generator().manual_seed(1000 * case + rank)
        torch.manual_seed(case)  # the same experts on every rank
        reference = TinyMoE()
        parallel = copy.deepcopy(reference)
        apply_expert_parallel(parallel)
        tokens = int(torch.randint(0, 10, (), generator=generator))
        k = 1 + case % 3
        scores = torch.rand(tokens, NUM_EXPERTS, generator=generator)
        if case % 4 == 3:  # skewed: only experts 0 and 1 are ever chosen
            scores[:, 2:] -= 2.0
        weights, indices = scores.softmax(-1).topk(k, dim=-1)
        x = torch.randn(tokens, HIDDEN, generator=generator)
        grad_out = torch.randn(tokens, HIDDEN, generator=generator)
        results = []
        for module in (reference, parallel):
            x_leaf, w_leaf = x.clone().requires_grad_(), weights.clone().requires_grad_()
            out = module.routed_experts(x_leaf, Routing(indices, w_leaf))
            out.backward(grad_out)
            results.append((out.detach(), x_leaf.grad, w_leaf.grad))
        for key, got, want in zip(("out", "x_grad", "weight_grad"), results[1], results[0]):
            worst[key] = max(worst[key], (got - want).abs().max().item() if got.numel() else 0.0)
        for index, expert in enumerate(reference.experts):
            for name, param in expert.named_parameters():
                summed = param.grad.clone()
                dist.all_reduce(summed)
                mine = parallel.experts[index]
                if mine is not None:
                    got = dict(mine.named_parameters())[name].grad
                    worst["expert_grad"] = max(worst["expert_grad"], (got - summed / world_size).abs().max().item())
    torch.save(worst, Path(out_dir) / f"ep_random-rank{rank}.pt")


def _flash_snapshot_of_fsdp(rank: int, out_dir: str) -> None:
    """Snapshot an FSDP2 model + AdamW mid-run, train on, restore the snapshot into the live
    (sharded) objects, train the same step again: the result must equal the first continuation."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ling_dist import FlashCheckpointer, apply_fsdp

    model = make_model()
    apply_fsdp(model, units=[Block])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_step(step: int) -> None:
        optimizer.zero_grad()
        loss_fn(model, *batch(rank, step)).backward()
        optimizer.step()

    def full_params() -> list[torch.Tensor]:
        return [_full(p.detach()).clone() for p in model.parameters()]

    train_step(0)
    checkpointer = FlashCheckpointer(Path(out_dir) / "flash-fsdp", keep_last=1, optimizers=[optimizer])  # overlapped
    model_state, optimizer_state = get_state_dict(model, optimizer)
    checkpointer.save(1, {"model": model_state, "optimizer": optimizer_state})
    train_step(1)  # the copy runs during its forward/backward; its optimizer.step() waits for it
    checkpointer.close()
    continued = full_params()
    train_step(2)  # drift further, then go back to the snapshot
    like_model, like_optimizer = get_state_dict(model, optimizer)
    step, state = checkpointer.restore(like={"model": like_model, "optimizer": like_optimizer})
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    train_step(1)
    replayed = full_params()
    torch.save({"step": step, "equal": all(torch.equal(a, b) for a, b in zip(continued, replayed)),
                "sharded": type(state["model"]["blocks.0.mix.weight"]).__name__},
               Path(out_dir) / f"flash_fsdp-rank{rank}.pt")


def mixed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """A rank of a real mixed CPU+CUDA job (run with one visible GPU: rank 0 gets cuda:0, rank 1
    the CPU). Exercises what Local SGD and expert parallel send across the two kinds of device:
    ling_dist.collectives with automatic staging, and the plain gloo collectives local_sgd.py
    calls on device tensors (async all_reduce, broadcast, all_gather_into_tensor)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ling_dist import collectives, init_distributed

    _, _, device = init_distributed(device="auto")
    summed = collectives.all_reduce(torch.arange(5.0, device=device) * (rank + 1))
    rows = torch.arange(3 * world_size, dtype=torch.float32, device=device).reshape(-1, 1) + 100 * rank
    received = torch.empty(3 * world_size, 1, device=device)
    collectives.all_to_all_single(received, rows, None, None)
    flat = torch.full((7,), float(rank + 1), device=device)
    dist.all_reduce(flat, async_op=True).wait()
    anchor = torch.arange(4.0, device=device) if rank == 0 else torch.zeros(4, device=device)
    dist.broadcast(anchor, src=0)
    gathered = torch.empty(world_size, device=device)
    dist.all_gather_into_tensor(gathered, torch.tensor([float(rank)], device=device))
    torch.save({"device": device.type, "summed": summed.cpu(), "received": received.cpu(), "flat": flat.cpu(),
                "anchor": anchor.cpu(), "gathered": gathered.cpu()}, Path(out_dir) / f"mixed-rank{rank}.pt")
    dist.destroy_process_group()
