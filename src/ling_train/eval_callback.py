"""In-training evaluation: every N steps, score the model on ling-eval tasks and append a row
{"step": N, "eval/<task>": score, "eval/<task>/ci_low": ..., "eval/<task>/ci_high": ...} to
RUN/metrics.jsonl (through the metrics logger, so rows stay in order in one file)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ling_eval import EvalError, Task, evaluate
from ling_eval.tasks import resolve_task
from ling_train.trainer import Callback, Trainer

log = logging.getLogger("ling_train")


def load_eval_tasks(specs: Sequence[str]) -> list[Task]:
    """Task files or built-in task names; a bad one is an EvalError naming it."""
    if not specs:
        raise EvalError("eval_tasks: empty (expected task files or built-in names such as facts_mc)")
    return [resolve_task(spec) for spec in specs]


def eval_row(step: int, results) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step}
    for result in results:
        metric = result.metrics[result.primary]
        row[f"eval/{result.task}"] = metric.value
        row[f"eval/{result.task}/ci_low"] = metric.ci_low
        row[f"eval/{result.task}/ci_high"] = metric.ci_high
    return row


class EvalCallback(Callback):
    """Scores the model every `every` steps and once at the end (if the last step was not
    scored), in eval mode under the trainer's autocast, then restores train mode."""

    def __init__(self, every: int, tasks: list[Task], tokenizer_path: Path, write: Callable[[dict], None],
                 limit: int | None = None, seed: int = 0, batch_size: int = 32):
        self.every = every
        self.tasks = tasks
        self.tokenizer_path = tokenizer_path
        self.write = write
        self.limit = limit
        self.seed = seed
        self.batch_size = batch_size
        self.tokenizer = None
        self.last_scored = -1

    def on_train_start(self, trainer: Trainer) -> None:
        from ling_data import Tokenizer
        self.tokenizer = Tokenizer.load(self.tokenizer_path)

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        if step % self.every == 0:
            self.score(trainer, step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.last_scored != trainer.step and trainer.step > 0:
            self.score(trainer, trainer.step)

    def score(self, trainer: Trainer, step: int) -> dict[str, Any]:
        from ling_train.eval_model import ling_eval_model

        was_training = trainer.model.training
        try:
            with trainer.autocast():
                results = evaluate(ling_eval_model(trainer.model), self.tokenizer, self.tasks, seed=self.seed,
                                   batch_size=self.batch_size, limit=self.limit, keep_predictions=False)
        finally:
            trainer.model.train(was_training)
        row = eval_row(step, results)
        self.write(row)
        self.last_scored = step
        log.info("step %d eval: %s", step, ", ".join(f"{r.task} {r.primary}={r.score:.4f}" for r in results))
        return row
