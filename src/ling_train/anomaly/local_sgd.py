"""Anomaly handling across Local SGD workers (`ling-train --nproc N --dist edit|aedit|diloco`).

What crosses ranks does so at sync points, the moments every rank passes together (after the same
number of its own updates under EDiT, at the same agreed sync under A-EDiT):

- Pseudo-gradient outliers. EDiT's penalty (`ling_dist.PseudoGradientPenalty`, the one
  implementation) drops a worker whose pseudo-gradient norm has an EWMA z-score above its
  threshold, or is not finite, and exposes the z-score it judged by in `SyncStats.z_scores`. Every
  rank sees the same decision; rank 0 writes one row per dropped worker:
  `{"event": "anomaly", "detector": "pseudo_gradient_outlier", "step", "sync", "rank",
  "statistic": {"z", "norm", "z_threshold"}, "batches": [...], "response": "excluded"}`, where
  `batches` are the batches that worker updated on since the previous sync (with their documents
  when the loader can name them). Only that worker knows them, so at a sync that drops someone the
  ranks all-gather them (nothing extra is sent at other syncs).
- Per-rank events. With an `[anomaly]` table every rank runs its own `AnomalyMonitor`; its rows
  (tagged with `rank`) are buffered here and all-gathered at each sync point and at the end, and
  rank 0 writes them. A stop request from any rank's monitor stops every rank after that sync point.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch.distributed as dist

from ling_dist import LocalSGD
from ling_train.anomaly.loader import identify, loader_position
from ling_train.anomaly.monitor import AnomalyMonitor
from ling_train.distributed import json_plain
from ling_train.trainer import Callback, Trainer


class LocalSGDAnomalies(Callback):
    def __init__(self, rank: int, world_size: int, local_sgd: LocalSGD, write: Callable[[dict], None],
                 describe: Callable[[dict[str, int]], dict[str, Any]] | None = None,
                 monitor: AnomalyMonitor | None = None):
        self.rank, self.world_size, self.local_sgd, self.write = rank, world_size, local_sgd, write
        self.describe, self.monitor = describe, monitor
        if monitor is not None and world_size > 1:
            monitor.emit = self.buffer  # rank 0 writes every rank's rows, at sync points
        self.pending_rows: list[dict[str, Any]] = []
        self.interval: list[dict[str, Any]] = []  # this rank's batches updated on since the last sync
        self.position: dict[str, int] = {}
        self.seen_sync_points = 0

    def buffer(self, row: dict[str, Any]) -> None:
        self.pending_rows.append({**row, "rank": self.rank})

    def on_train_start(self, trainer: Trainer) -> None:
        self.seen_sync_points = self.local_sgd.sync_points

    def pre_step(self, trainer: Trainer, step: int) -> None:
        # Without an AnomalyLoader nothing skips batches: the loader's position before the draw
        # is the position of the batch this step trains on.
        self.position = loader_position(trainer.loader)

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        loader = trainer.loader
        if hasattr(loader, "last_index"):  # an AnomalyLoader: the batch actually drawn, after skips
            self.interval.append({"batch": loader.last_index, **loader.last_position})
        else:
            self.interval.append(dict(self.position))
        lsgd = self.local_sgd
        if lsgd.sync_points == self.seen_sync_points:
            return
        self.seen_sync_points = lsgd.sync_points
        sync = lsgd.last_sync
        excluded = list(sync.excluded) if sync is not None and not sync.skipped else []
        if self.monitor is not None or excluded:  # the same on every rank: all take part or none
            gathered = self._exchange(rank_batches=self.rank in excluded)
            self._write_outliers(step, sync, excluded, gathered)
            self._stop_if_requested(trainer, gathered)
        if sync is not None and not sync.skipped:  # a skipped sync point rolls the interval over
            self.interval = []

    def on_train_end(self, trainer: Trainer) -> None:
        if self.monitor is not None:  # rows since the last sync point (every rank ends together)
            self._exchange(rank_batches=False)

    # --- helpers ---
    def _exchange(self, rank_batches: bool) -> list[dict[str, Any]]:
        """All-gather every rank's buffered rows, stop request and (if asked) its interval's
        batches; rank 0 writes the rows in rank order."""
        mine = {"rows": self.pending_rows, "stop": self.monitor.stop_requested if self.monitor else None,
                "batches": [identify(b, self.describe) for b in self.interval] if rank_batches else None}
        self.pending_rows = []
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        for payload in gathered:
            for row in payload["rows"]:
                self.write(row)
        return gathered

    def _write_outliers(self, step: int, sync: Any, excluded: list[int], gathered: list[dict[str, Any]]) -> None:
        threshold = getattr(self.local_sgd.weighting, "z_threshold", None)
        for rank in excluded:
            z = sync.z_scores[rank] if sync.z_scores else math.nan
            norm = sync.norms[rank]
            self.write({"event": "anomaly", "step": step, "detector": "pseudo_gradient_outlier", "rank": rank,
                        "sync": sync.index,
                        "statistic": json_plain({"z": z, "norm": norm, "z_threshold": threshold}),
                        "batches": gathered[rank]["batches"], "response": "excluded"})

    def _stop_if_requested(self, trainer: Trainer, gathered: list[dict[str, Any]]) -> None:
        stops = [f"rank {rank}: {payload['stop']}" for rank, payload in enumerate(gathered) if payload["stop"]]
        if stops:
            trainer.should_stop = True  # on every rank, after this same sync point
            if self.monitor is not None:
                self.monitor.aborted = "; ".join(stops)
