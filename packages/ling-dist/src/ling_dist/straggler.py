"""Straggler detection: which rank keeps the others waiting?

In synchronous training every step runs at the pace of the slowest rank, and a slow rank
(thermal throttling, a noisy neighbour, a failing link) shows up only as a lower global
throughput. Each rank reports its own step times; every `interval` steps the ranks all-gather
their mean step time over the interval (one float each), and a rank whose mean exceeds
`factor` x the median for `patience` consecutive intervals is flagged: the records come back
for the metrics log (`RUN/metrics.jsonl` rows with `rank`) and rank 0 logs a warning.

The median is the lower median (torch.median), so with two ranks the reference is the faster
one, and a slow half of the job cannot raise the bar it is measured against.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StragglerRecord:
    """One rank's standing at the end of an interval (every rank gets every rank's record)."""

    step: int
    rank: int
    mean_step_s: float
    median_step_s: float
    slowdown: float  # mean_step_s / median_step_s
    slow_intervals: int  # consecutive intervals above the factor, this one included
    straggler: bool  # slow_intervals >= patience

    def as_metrics(self) -> dict:
        return {"event": "straggler" if self.straggler else "step_time", **asdict(self)}


class StragglerMonitor:
    """`record(step_seconds)` once per step on every rank; returns the interval's records for all
    ranks when an interval ends (a collective: all ranks must call it equally often), else []."""

    def __init__(self, *, interval: int = 20, factor: float = 1.5, patience: int = 3,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if interval < 1 or patience < 1:
            raise ValueError(f"interval={interval}, patience={patience}: expected both >= 1")
        if factor <= 1.0:
            raise ValueError(f"factor={factor}: expected > 1 (a rank slower than factor x the median is flagged)")
        self.interval, self.factor, self.patience = interval, factor, patience
        self.process_group = process_group
        self.steps = 0
        self._seconds = 0.0
        self._slow_intervals: list[int] | None = None

    def record(self, step_seconds: float) -> list[StragglerRecord]:
        self.steps += 1
        self._seconds += step_seconds
        if self.steps % self.interval:
            return []
        mean = torch.tensor([self._seconds / self.interval], dtype=torch.float64)
        self._seconds = 0.0
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend(self.process_group) == "nccl":  # nccl moves CUDA tensors only
                mean = mean.to(torch.device("cuda", torch.cuda.current_device()))
            gathered = [torch.empty_like(mean) for _ in range(dist.get_world_size(self.process_group))]
            dist.all_gather(gathered, mean, group=self.process_group)
            means = torch.cat(gathered).cpu()
        else:
            means = mean
        median = means.median().item()
        if self._slow_intervals is None:
            self._slow_intervals = [0] * len(means)
        records = []
        for rank, seconds in enumerate(means.tolist()):
            slowdown = seconds / median if median > 0 else 1.0
            self._slow_intervals[rank] = self._slow_intervals[rank] + 1 if slowdown > self.factor else 0
            records.append(StragglerRecord(self.steps, rank, seconds, median, slowdown, self._slow_intervals[rank],
                                           self._slow_intervals[rank] >= self.patience))
        stragglers = [r for r in records if r.straggler]
        if stragglers and (not dist.is_initialized() or dist.get_rank(self.process_group) == 0):
            logger.warning("step %d: straggler rank(s) %s: %s x the median step time %.4f s for %d+ intervals",
                           self.steps, ", ".join(str(r.rank) for r in stragglers),
                           ", ".join(f"{r.slowdown:.2f}" for r in stragglers), median, self.patience)
        return records
