"""Trainer callbacks of the default run: metrics file, progress bar, checkpoints, routing warmup."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ling_train.trainer import Callback, Trainer


class RoutingWarmupStep(Callback):
    """Tells the model the step before each forward (Stochastic Routing Warmup reads it)."""

    def pre_step(self, trainer: Trainer, step: int) -> None:
        model = getattr(trainer.model, "module", trainer.model)  # through a DDP wrapper
        set_step = getattr(model, "set_step", None)
        if set_step is not None:
            set_step(step - 1)


class MetricsLogger(Callback):
    """Appends one JSON row per logged step to `metrics.jsonl`, adding tokens/s and MFU
    (model FLOPs/s over the measured matmul rate). Rows are flushed as written so a crash
    loses nothing already logged."""

    def __init__(self, path: Path, flops_per_token: float, peak_flops: float, log_every: int = 1):
        self.path = path
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.log_every = log_every
        self.file = None

    def write(self, row: dict[str, Any]) -> None:
        if self.file is None:
            self.file = open(self.path, "a", buffering=1)
        self.file.write(json.dumps(row) + "\n")

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        tokens_per_s = metrics["tokens"] / metrics["step_time_s"]
        metrics["tokens_per_s"] = tokens_per_s
        metrics["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        if step % self.log_every == 0 or step == trainer.settings.total_steps:
            self.write({"step": step, **metrics})

    def on_checkpoint(self, trainer: Trainer, step: int, path: Any) -> None:
        seconds = next((cb.last_save_s for cb in trainer.callbacks if isinstance(cb, Checkpointer)), None)
        self.write({"event": "checkpoint", "step": step, "path": str(path), "save_s": seconds})

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.write({"event": "error", "step": trainer.step, "error": f"{type(error).__name__}: {error}"})
        self.close()

    def on_train_end(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ProgressBar(Callback):
    """tqdm on stderr: steps with loss, tokens/s and ETA."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.bar = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.settings.total_steps, initial=trainer.step, unit="step",
                        file=sys.stderr, disable=self.disable, dynamic_ncols=True)

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{metrics.get('lm_loss', metrics['loss']):.3f}",
                             tok_s=f"{metrics.get('tokens_per_s', 0):.0f}", refresh=False)
        self.bar.update(1)

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.on_train_end(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpointer(Callback):
    """Saves every `every` steps and at the end through `save(step) -> path`, then tells the
    other callbacks through `on_checkpoint`."""

    def __init__(self, save: Callable[[int], Path], every: int):
        self.save = save
        self.every = every
        self.last_saved = -1
        self.last_save_s: float | None = None  # how long the last save held the step (metrics: save_s)

    def _save(self, trainer: Trainer, step: int) -> None:
        start = time.perf_counter()
        path = self.save(step)
        self.last_save_s = time.perf_counter() - start
        self.last_saved = step
        for cb in trainer.callbacks:
            cb.on_checkpoint(trainer, step, path)

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        # trainer.step != step: a callback before this one rolled the run back (anomaly handling)
        if self.every and step % self.every == 0 and trainer.step == step:
            self._save(trainer, step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.last_saved != trainer.step:
            self._save(trainer, trainer.step)


class Timer(Callback):
    """Wall time of the whole run, for the final summary."""

    def on_train_start(self, trainer: Trainer) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class ResumedLossCheck(Callback):
    """A non-finite loss on the first step after a resume means the checkpoint's weights are bad
    (e.g. corrupt bytes in a checkpoint without checksums), not that training diverged: stop
    before the update, naming the checkpoint, rather than train on NaN and checkpoint it."""

    def __init__(self, checkpoint: Path):
        self.checkpoint, self.checked = checkpoint, False

    def skip_update(self, trainer: Trainer, step: int, metrics: dict[str, Any], output: Any) -> bool:
        if not self.checked:
            self.checked = True
            if not math.isfinite(metrics["loss"]):
                from ling_core import CheckpointError
                raise CheckpointError(f"--resume {self.checkpoint}: the first step's loss is {metrics['loss']} "
                                      f"(expected a finite loss); the checkpoint's weights are corrupt")
        return False
