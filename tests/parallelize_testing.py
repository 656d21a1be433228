"""Spawned rank for tests/test_parallelize.py: a reduced Ling MoE under FSDP2 + expert parallel."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ling_core import build_model, preset

SEQ_LEN, ROWS_PER_RANK = 16, 2


def config():
    # Balance loss is a nonlinear function of the batch's routing statistics, so a per-rank mean
    # differs from the whole batch's; switch it off (and routing noise) for an exact comparison.
    return preset("tiny").replace(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4,
                                  moe_intermediate_size=32, balance_loss_weight=0.0, routing_warmup_steps=0)


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(512, (ROWS_PER_RANK, SEQ_LEN + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def worker(rank: int, world_size: int, port: int, out_dir: str, data_parallel: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ling_dist import init_distributed
    from ling_train.parallelize import parallelize

    init_distributed(backend="gloo")
    model = build_model(config(), seed=0)
    trained = parallelize(model, data_parallel=data_parallel, expert_parallel=True)
    loss = trained(*batch(rank)).loss
    loss.backward()
    grads = {name: full(p.grad).clone() for name, p in model.named_parameters()}
    torch.save({"loss": loss.item(), "grads": grads}, Path(out_dir) / f"{data_parallel}-rank{rank}.pt")
    dist.destroy_process_group()
