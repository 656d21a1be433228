"""`AnomalyMonitor`: the trainer callback that runs the detectors and applies the responses.

Per step, after backward and before the optimizer step (`Callback.skip_update`), the detectors
look at the step; on an anomaly the configured response runs, the most severe one winning when
several fire: log < lower_lr < skip < skip_reinject < rollback < abort.

- skip: the update is dropped (weights, optimizer state and LR schedule untouched);
- skip_reinject: skip, and the batch's sequences come back inside later batches;
- lower_lr: the LR is scaled by `lr_factor` for `lr_cooldown_steps` steps (also applied on top of
  any response when `lower_lr_after` interventions fall within `window` steps: persistence);
- rollback: restore the last good in-memory snapshot (weights, optimizer, schedule, loader, RNG)
  and replay from there, passing over the batches flagged since it;
- abort: restore the last good snapshot (if any), stop, and say why.
Every intervention counts against `max_interventions`; past it the run aborts. Every event is a
row of metrics.jsonl: {"event", "step", "detector", "statistic", "batch", "epoch", "position",
"documents", "response"}.

With several Local SGD workers (`workers > 1`, EDiT / A-EDiT; `check_workers` refuses the rest)
every response stays on this rank: skip, re-inject and lower_lr need no other rank, and this rank
still reaches each sync after the same number of updates. What would restore rank-local state
(rollback, abort, non-finite weights) becomes a *stop request* instead: this rank keeps stepping,
and `LocalSGDAnomalies` stops every rank together after the next sync point, where EDiT's penalty
drops a non-finite pseudo-gradient. No snapshots are taken then.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

from ling_core.hf_io import write_text_atomic
from ling_train.anomaly.config import AnomalyConfig
from ling_train.anomaly.detectors import Anomaly, ExpertCollapse, NonFinite, RouterEntropy, Spike, weights_finite
from ling_train.anomaly.loader import AnomalyLoader
from ling_train.trainer import Callback, Trainer

log = logging.getLogger("ling_train.anomaly")

SEVERITY = ("log", "lower_lr", "skip", "skip_reinject", "rollback", "abort")


class Snapshot:
    """An in-memory copy of everything a step changes: weights and the trainer state (optimizer,
    schedule, loader, RNG), plus the detectors' windows as they were."""

    def __init__(self, trainer: Trainer, detector_state: dict):
        self.step = trainer.step
        self.weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        state = trainer.state_dict()
        state.pop("callbacks", None)  # the monitor's own counters must survive a rollback
        self.trainer_state = copy.deepcopy(state)
        self.detector_state = copy.deepcopy(detector_state)

    def restore(self, trainer: Trainer) -> None:
        trainer.before_state_rewrite(self.step)  # e.g. a flash snapshot still copying these tensors
        trainer.model.load_state_dict(self.weights)
        # deepcopy: optimizer.load_state_dict keeps same-device tensors by reference, and the next
        # in-place update would otherwise corrupt this snapshot for a later rollback.
        trainer.load_state_dict(copy.deepcopy(self.trainer_state))


class AnomalyMonitor(Callback):
    def __init__(self, config: AnomalyConfig, loader: AnomalyLoader, emit: Callable[[dict], None],
                 router_type: type | None = None, report_path: Path | None = None, workers: int = 1):
        self.config, self.loader, self.emit = config, loader, emit
        self.workers = workers
        self.stop_requested: str | None = None  # several workers: stop every rank at the next sync point
        self.router_type, self.report_path = router_type, report_path
        self.nonfinite = NonFinite()
        self.loss_spike = Spike("loss_spike", "loss", config.window, config.min_history, config.loss_z,
                                min_rise=config.loss_min_rise)
        self.grad_spike = Spike("grad_spike", "grad_norm", config.window, config.min_history, config.grad_z,
                                min_ratio=config.grad_min_ratio, log=True)
        self.expert = ExpertCollapse(config.expert_max_load, config.expert_dead_steps)
        self.router = RouterEntropy(config.router_entropy_min, config.router_every)
        self.interventions = 0
        self.recent: deque[int] = deque()  # steps of recent interventions (persistence)
        self.lr_scale, self.lr_scale_until = 1.0, 0
        self.flagged: list[int] = []  # batch indices with anomalies since the last snapshot
        self.recent_batches: deque[int] = deque(maxlen=max(config.expert_dead_steps, 1))
        self.snapshot: Snapshot | None = None
        self.counts: Counter[str] = Counter()
        self.aborted: str | None = None

    # --- trainer hooks ---
    def on_train_start(self, trainer: Trainer) -> None:
        if self.config.router_entropy_min > 0 and self.router_type is not None:
            self.router.attach(trainer.model, self.router_type)
        if self.config.snapshot_every and self.workers == 1:
            self._take_snapshot(trainer)

    def pre_step(self, trainer: Trainer, step: int) -> None:
        self.router.arm(step)
        if self.lr_scale != 1.0 and step > self.lr_scale_until:
            self.lr_scale = 1.0
            self._apply_lr(trainer)
            self.emit({"event": "lr_restored", "step": step})
        elif self.lr_scale != 1.0:
            self._apply_lr(trainer)

    def skip_update(self, trainer: Trainer, step: int, metrics: dict[str, Any], output: Any) -> bool:
        if self.stop_requested:  # keep stepping, so this rank reaches the sync point where all stop
            return False
        found = self.nonfinite.check(metrics)
        if not found:  # spikes are measured on finite values only
            found = self.loss_spike.check(metrics) + self.grad_spike.check(metrics)
        found += self.expert.check(metrics, getattr(output, "tokens_per_expert", None))
        found += self.router.check()
        if not found:
            self._accept(metrics)
            return False
        response = max((self.config.detector_responses[a.detector] for a in found), key=SEVERITY.index)
        if found[0].detector == "nonfinite" and not weights_finite(trainer.model):
            # NaN weights make every later loss NaN: skipping cannot help, only a rollback can.
            found = [Anomaly("nonfinite", {"weights": "non-finite"})]
            if self.workers > 1:
                return self._request_stop(step, found)
            response = "rollback"
            self._flag_since_snapshot()
        self._record(step, found, response)
        if response == "log":
            self._accept(metrics)
            return False
        return self._intervene(trainer, step, response)

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        check_every, snapshot_every = self.config.param_check_every, self.config.snapshot_every
        if not ((check_every and step % check_every == 0) or (snapshot_every and step % snapshot_every == 0)):
            return
        if not weights_finite(trainer.model):
            if self.workers > 1:
                self._request_stop(step, [Anomaly("nonfinite", {"weights": "non-finite"})])
                return
            self._flag_since_snapshot()
            self._record(step, [Anomaly("nonfinite", {"weights": "non-finite"})], "rollback")
            self._intervene(trainer, step, "rollback")
        elif snapshot_every and step % snapshot_every == 0 and self.workers == 1:
            self._take_snapshot(trainer)

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.router.detach()
        self._write_report(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self.router.detach()
        self._write_report(trainer)

    # --- responses ---
    def _intervene(self, trainer: Trainer, step: int, response: str) -> bool:
        self.interventions += 1
        window = self.config.window
        self.recent.append(step)
        while self.recent and self.recent[0] <= step - window:
            self.recent.popleft()
        if self.interventions > self.config.max_interventions:
            reason = f"{self.interventions} interventions exceed max_interventions={self.config.max_interventions}"
            if self.workers > 1:
                self._request_stop(step, [], reason)
                return response in ("skip", "skip_reinject")
            self._abort(trainer, step, reason)
            return True
        persistent = self.config.lower_lr_after and len(self.recent) >= self.config.lower_lr_after
        if response == "lower_lr" or persistent:
            self._lower_lr(trainer, step, "persistent" if persistent else "response")
            self.recent.clear()
        if response in ("skip", "skip_reinject"):
            if response == "skip_reinject":
                self.loader.reinject_last()
            return True
        if response == "rollback":
            if self.snapshot is None:
                self._abort(trainer, step, "rollback requested but no snapshot exists")
            else:
                self._rollback(trainer, step)
            return True
        if response == "abort":
            self._abort(trainer, step, "an anomaly whose response is 'abort'")
            return True
        return False  # lower_lr: the update goes ahead at the lowered LR

    def _request_stop(self, step: int, found: list[Anomaly], reason: str = "non-finite weights") -> bool:
        """Several workers: record, and ask every rank to stop after the next sync point (this rank
        keeps taking its updates so it reaches it; EDiT's penalty drops a non-finite one there)."""
        if self.stop_requested:
            return False
        if found:
            self._record(step, found, "stop_at_sync")
        self.stop_requested = self.aborted = reason
        self.counts["stop_requested"] += 1
        self.emit({"event": "anomaly_abort", "step": step, "reason": reason, "restored_step": None,
                   "at": "next sync point", "interventions": self.interventions, "counts": dict(self.counts)})
        log.error("anomaly: stopping every rank at the next sync point (step %d): %s", step, reason)
        return False

    def _rollback(self, trainer: Trainer, step: int) -> None:
        skipped = sorted(set(self.flagged) | {self.loader.last_index})
        self.snapshot.restore(trainer)
        self.loader.skip(skipped)
        self._load_detector_state(copy.deepcopy(self.snapshot.detector_state))
        self.flagged.clear()
        self.counts["rollback"] += 1
        self.emit({"event": "rollback", "step": step, "to_step": self.snapshot.step, "skipped_batches": skipped})
        log.warning("anomaly: rolled back from step %d to step %d, skipping batches %s", step,
                    self.snapshot.step, skipped)

    def _lower_lr(self, trainer: Trainer, step: int, reason: str) -> None:
        self.lr_scale *= self.config.lr_factor
        self.lr_scale_until = step + self.config.lr_cooldown_steps
        self._apply_lr(trainer)
        self.counts["lr_lowered"] += 1
        self.emit({"event": "lr_lowered", "step": step, "scale": self.lr_scale,
                   "until_step": self.lr_scale_until, "reason": reason})

    def _apply_lr(self, trainer: Trainer) -> None:
        for group, scheduled in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr()):
            group["lr"] = scheduled * self.lr_scale

    def _abort(self, trainer: Trainer, step: int, reason: str) -> None:
        restored = None
        if self.snapshot is not None:
            self.snapshot.restore(trainer)
            restored = self.snapshot.step
        self.aborted = reason
        trainer.should_stop = True
        self.emit({"event": "anomaly_abort", "step": step, "reason": reason, "restored_step": restored,
                   "interventions": self.interventions, "counts": dict(self.counts)})
        log.error("anomaly: aborting at step %d: %s (weights restored to step %s)", step, reason, restored)

    # --- bookkeeping ---
    def _record(self, step: int, found: list[Anomaly], response: str) -> None:
        batch = self.loader.batch_info()
        self.flagged.append(batch["batch"])
        for anomaly in found:
            implicated = [*self.recent_batches, batch["batch"]][-anomaly.batches:]
            self.flagged.extend(implicated)
            extra = {"batches": implicated} if anomaly.batches > 1 else {}
            self.counts[anomaly.detector] += 1
            self.emit({"event": anomaly.detector, "step": step, "detector": anomaly.detector,
                       "statistic": anomaly.statistic, **batch, **extra, "response": response})
            log.warning("anomaly: %s at step %d (%s) on batch %s -> %s", anomaly.detector, step,
                        anomaly.statistic, batch["batch"], response)

    def _flag_since_snapshot(self) -> None:
        """The culprit of broken weights is some batch since the snapshot: skip them all."""
        since = self.snapshot.trainer_state["loader"].get("batches_drawn", 0) if self.snapshot else 0
        self.flagged.extend(range(since, self.loader.batches_drawn))

    def _accept(self, metrics: dict[str, Any]) -> None:
        self.recent_batches.append(self.loader.last_index)
        self.loss_spike.accept(metrics)
        self.grad_spike.accept(metrics)
        self.expert.accept()

    def _take_snapshot(self, trainer: Trainer) -> None:
        if not weights_finite(trainer.model):
            return
        self.snapshot = Snapshot(trainer, self._detector_state())
        self.flagged.clear()

    def _detector_state(self) -> dict:
        return {"loss": self.loss_spike.window.state_dict(), "grad": self.grad_spike.window.state_dict(),
                "expert": self.expert.state_dict()}

    def _load_detector_state(self, state: dict) -> None:
        self.loss_spike.window.load_state_dict(state["loss"])
        self.grad_spike.window.load_state_dict(state["grad"])
        self.expert.load_state_dict(state["expert"])

    def summary(self) -> dict[str, Any]:
        return {"interventions": self.interventions, "counts": dict(self.counts), "aborted": self.aborted,
                "skipped_batches": sorted(self.loader.skipped), "lr_scale": self.lr_scale}

    def _write_report(self, trainer: Trainer) -> None:
        if self.report_path is not None:
            write_text_atomic(self.report_path, json.dumps({"step": trainer.step, **self.summary()}, indent=2) + "\n")

    # --- resumable state (saved in the checkpoint's trainer state) ---
    def state_dict(self) -> dict[str, Any]:
        return {"detectors": self._detector_state(), "interventions": self.interventions,
                "recent": list(self.recent), "lr_scale": self.lr_scale, "lr_scale_until": self.lr_scale_until,
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_detector_state(state["detectors"])
        self.interventions = state["interventions"]
        self.recent = deque(state["recent"])
        self.lr_scale, self.lr_scale_until = state["lr_scale"], state["lr_scale_until"]
        self.counts = Counter(state["counts"])
