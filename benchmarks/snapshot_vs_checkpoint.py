"""How long a flash snapshot holds the training step, against the synchronous HF checkpoint of the
same run (the anchor), from one `ling-train --nproc 2 --dist ddp` run's metrics.jsonl.

    uv run python benchmarks/snapshot_vs_checkpoint.py [--steps 17] [--size tiny]

Snapshots every 4 steps, HF checkpoints every 8 (and at the end), so both are taken several times
in one run. Prints, from rank 0's rows: the median `snapshot_blocking_s` (the `save()` call plus
the fence before the next optimizer step), the median checkpoint `save_s`, their ratio, and the
median step time of the steps that run while a snapshot is written in the background against the
other steps (on a machine without a spare core the writer thread slows those steps: that is the
snapshot's real cost there). Also the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=17)
    parser.add_argument("--size", default="tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text("checkpoint_every = 8\nsnapshot_every = 4\nbatch_size = 4\nseq_len = 64\n")
        load_before = os.getloadavg()
        command = [sys.executable, "-m", "ling_train.cli", "--config", str(config), "--size", args.size,
                   "--steps", str(args.steps), "--nproc", "2", "--dist", "ddp", "--out", str(Path(tmp) / "run"),
                   "--device", "cpu", "--no-progress"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        load_after = os.getloadavg()
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    snapshots = [r for r in rows if r.get("event") == "snapshot"]
    checkpoints = [r for r in rows if r.get("event") == "checkpoint"]
    step_time = {r["step"]: r["step_time_s"] for r in rows if "event" not in r and "step_time_s" in r}
    after_snapshot = {r["step"] + 1 for r in snapshots} & set(step_time)
    blocking = statistics.median(r["snapshot_blocking_s"] for r in snapshots)
    checkpoint = statistics.median(r["save_s"] for r in checkpoints)
    during = statistics.median(step_time[s] for s in after_snapshot)
    others = statistics.median(t for s, t in step_time.items() if s not in after_snapshot and s > 1)
    print(json.dumps({
        "command": " ".join(command[1:]),
        "snapshots": len(snapshots), "checkpoints": len(checkpoints),
        "snapshot_blocking_s_median": blocking, "checkpoint_save_s_median": checkpoint,
        "blocking_ratio": blocking / checkpoint,
        "step_time_s_while_writing_median": during, "step_time_s_other_median": others,
        "extra_step_time_ratio_to_checkpoint": (during - others) / checkpoint,
        "load_average_before_after": [load_before, load_after]}, indent=2))


if __name__ == "__main__":
    main()
