"""Can a freshly initialised preset learn to copy from its context? A probe for heads and widths.

    uv run python scripts/copy_probe.py [--size tiny] [--norm-head true|false] [--steps 200]

Each batch is a random sequence of 32 symbols drawn from 64 token ids, shown twice after EOS;
only the second copy carries loss. Its tokens are unpredictable except by looking back 32
positions, so the loss falls below chance (ln 64 = 4.16) only once attention has learnt to copy:
the skill tool calls need to put a question's entity into their arguments. Plain AdamW at a fixed
lr, no warmup or clipping, so the probe measures the model rather than the training recipe.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ling_core import preset
from ling_core.model import build_model

SYMBOLS = range(100, 164)  # 64 ordinary token ids of the 8192-token vocabulary
LENGTH = 32


def copy_batch(generator: torch.Generator, batch: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [batch, 1 + 2 * LENGTH]; labels[t] is the target of position t."""
    sequence = torch.randint(SYMBOLS.start, SYMBOLS.stop, (batch, LENGTH), generator=generator)
    ids = torch.cat([torch.full((batch, 1), eos_id), sequence, sequence], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, LENGTH + 1:-1] = ids[:, LENGTH + 2:]  # predict the second copy from its second token
    return ids, labels


def probe(size: str = "tiny", norm_head: bool | None = None, steps: int = 200, lr: float = 1e-3,
          batch: int = 16, seed: int = 0, report_every: int = 0) -> list[float]:
    """The second copy's loss after each step."""
    config = preset(size)
    if norm_head is not None:
        config = config.replace(norm_head=norm_head)
    model = build_model(config, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        ids, labels = copy_batch(generator, batch, config.eos_token_id)
        out = model(ids, labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
        if report_every and step % report_every == 0:
            print(f"step {step:4d}  second-copy loss {losses[-1]:.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--norm-head", choices=("true", "false"), default=None,
                        help="override the preset's norm_head")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    norm_head = None if args.norm_head is None else args.norm_head == "true"
    losses = probe(args.size, norm_head, args.steps, args.lr, args.batch, args.seed, report_every=25)
    print(f"chance {math.log(len(SYMBOLS)):.2f}; mean of the last 10 steps {sum(losses[-10:]) / 10:.3f}")


if __name__ == "__main__":
    main()
