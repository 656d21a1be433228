"""A tiny DDP training script for the elastic-restart test, run by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1 \\
        elastic_train.py OUT --steps 12 --snapshot-every 3 [--kill-at 7]

It resumes from the newest complete flash snapshot in OUT/snapshots (model, optimizer and the
loader's position), trains to --steps and writes rank 0's final parameters to OUT/final.pt.
With --kill-at S, on the first attempt only (TORCHELASTIC_RESTART_COUNT=0), rank 1 SIGKILLs
itself after step S, once every rank's last snapshot is on disk; torchrun then restarts both.
Each attempt appends "attempt A resumed_from S" to OUT/attempts.log (rank 0).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ling_dist import FlashCheckpointer, apply_ddp, init_distributed


class ToyLoader:
    """Deterministic batches indexed by (rank, position): a resumed loader continues the stream."""

    def __init__(self, rank: int) -> None:
        self.rank, self.position = rank, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(10_000 * self.rank + self.position)
        self.position += 1
        x = torch.randn(8, 4, generator=generator)
        return x, x.sum(-1, keepdim=True).sin()

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--snapshot-every", type=int, default=3)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world_size, _ = init_distributed(backend="gloo")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    ddp = apply_ddp(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = ToyLoader(rank)
    checkpointer = FlashCheckpointer(args.out / "snapshots", keep_last=2)

    start = 0
    restored = checkpointer.restore()
    if restored is not None:
        start, state = restored
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
    if rank == 0:
        with open(args.out / "attempts.log", "a") as log:
            log.write(f"attempt {attempt} resumed_from {start}\n")

    for step in range(start + 1, args.steps + 1):
        x, y = loader.next_batch()
        optimizer.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()
        if step % args.snapshot_every == 0:
            checkpointer.save(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "loader": loader.state_dict()})
        if step == args.kill_at and attempt == 0:
            checkpointer.wait()
            dist.barrier()  # every rank's snapshot is on disk: the test then knows where to resume
            if rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
    checkpointer.close()
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], args.out / "final.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
