"""Wall time of the tiny preset's `Trainer.train_step` in this checkout, without the profiler or
pytest-benchmark around it: for A/B runs of two checkouts (run it in each, alternating).

    uv run python scripts/time_train_step.py [--data corpus|random] [--steps 15] [--threads 2]

`corpus` batches come from the embedded corpus as `uv run ling-train` reads it, `random` from
the throughput benchmark's uniform token ids; both 16 x 128 tokens, after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("corpus", "random"), default="corpus")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from test_train_throughput import tiny_trainer

    from ling_core import preset
    from ling_train.config import RunConfig
    from ling_train.run import build_data

    loader = build_data(RunConfig(), preset("tiny").vocab_size).loader if args.data == "corpus" else None
    trainer = tiny_trainer(loader)
    for _ in range(3):
        trainer.train_step()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step()
        seconds.append(time.perf_counter() - start)
    print(f"{args.data}: {args.steps} steps, best {1e3 * min(seconds):.1f} ms, "
          f"median {1e3 * statistics.median(seconds):.1f} ms ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
