"""In-training evaluation: every N steps, score the model on ling-eval tasks and append a row
{"step": N, "eval/<task>": score, "eval/<task>/ci_low": ..., "eval/<task>/ci_high": ...,
"eval_weights": ...} to RUN/metrics.jsonl (through the metrics logger, so rows stay in order in
one file).

Under several processes rank 0 alone evaluates, on a plain copy of the model it builds from the
weights (`scored_weights`); no collective runs during the eval. Why not every rank running the
same eval on the trained module: the KV-cache path ling-eval uses (`eval_model.extend`) calls the
decoder layers' submodules directly, past FSDP2's per-layer all-gather hooks, so sharded weights
would reach it; EDiT's sync pre-hooks would let an eval forward finish a pending sync; nothing
makes expert-parallel logits bitwise equal on every rank, so a generation that stops on EOS could
run a different number of forwards (all-to-alls) on one rank; and A-EDiT ranks reach `step % N`
at different times. Rank 0 evaluating alone takes the same wall time (every rank would have run
the same batches). What it costs: under `--dist fsdp` / `--expert-parallel` the whole weights are
gathered to rank 0 at each eval (as for a checkpoint) and held on its device while it evaluates,
and the other ranks wait for rank 0 at their next collective, so an eval must finish within the
process group's timeout.

`eval_weights` says which weights a row scored: "global" (the one model of the job: one process,
DDP, FSDP2 and/or expert parallel gathered whole) or "rank0_local" (Local SGD on several ranks:
rank 0's own weights after its step, which equal the other ranks' only right after a completed
sync; EDiT and A-EDiT finish a sync in the next training forward, so an eval at a sync step scores
rank 0's weights from before that sync).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ling_eval import EvalError, Task, evaluate
from ling_eval.tasks import resolve_task
from ling_train.trainer import Callback, Trainer

log = logging.getLogger("ling_train")

GLOBAL_WEIGHTS = "global"
RANK0_LOCAL_WEIGHTS = "rank0_local"

# () -> the state dict to score on this rank, or None where another rank scores
WeightsSource = Callable[[], dict[str, torch.Tensor] | None]


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


def scored_weights(setup, config, model: torch.nn.Module) -> tuple[WeightsSource, str]:
    """(source, label) of the weights in-training eval scores (see the module docstring).

    Sharded weights (`--dist fsdp`, `--expert-parallel`): the source gathers them whole to rank 0,
    a collective that every rank calls at the same step (their step counts agree in these modes).
    Otherwise rank 0 scores its own `model` (the module DDP wraps, or a Local SGD worker's) and
    the source sends nothing, so A-EDiT ranks, which reach `step % N` at different times, never
    wait on each other for an eval."""
    from ling_dist import full_model_state_dict
    from ling_train.dist_checkpoint import whole_layout

    if whole_layout(config):  # never under Local SGD: --expert-parallel needs --dist ddp or fsdp
        return (lambda: full_model_state_dict(model)), GLOBAL_WEIGHTS
    label = RANK0_LOCAL_WEIGHTS if setup.local_sgd is not None and setup.world_size > 1 else GLOBAL_WEIGHTS
    return (lambda: model.state_dict() if setup.is_main else None), label


class EvalCallback(Callback):
    """Scores the weights from `weights` every `every` steps and once at the end (if the last step
    was not scored), under the trainer's autocast, on a plain model built from them; the trained
    module, its mode and its hooks are left alone, so an eval forward is never a training forward.
    Every rank calls `weights` at the same points; only the rank that gets weights evaluates and
    writes."""

    def __init__(self, every: int, tasks: list[Task], tokenizer_path: Path, write: Callable[[dict], None],
                 weights: WeightsSource, model_config, label: str = GLOBAL_WEIGHTS,
                 limit: int | None = None, seed: int = 0, batch_size: int = 32, local_sgd: bool = False):
        self.every = every
        self.tasks = tasks
        self.tokenizer_path = tokenizer_path
        self.write = write
        self.weights = weights
        self.model_config = model_config
        self.label = label
        self.local_sgd = local_sgd  # `weights` is then the live model's, read without a collective
        self.limit = limit
        self.seed = seed
        self.batch_size = batch_size
        self.tokenizer = None
        self.last_scored = -1
        self.scored_versions: tuple[int, ...] | None = None  # the scored tensors' in-place write counters

    def on_train_start(self, trainer: Trainer) -> None:
        from ling_data import Tokenizer
        self.tokenizer = Tokenizer.load(self.tokenizer_path)

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        last = trainer.should_stop or step == trainer.settings.total_steps  # on_train_end scores it
        if step % self.every == 0 and not last:
            self.score(trainer, step)

    def on_train_end(self, trainer: Trainer) -> None:
        """Score the final weights unless the last row already did. Under Local SGD the last step's
        row may predate the final sync, which completes only when the run ends (the final
        checkpoint's `state_dict()` finishes it): then the scoring rank scores again, a second row
        for the same step, so the last row always holds what the final checkpoint holds. (No
        collective: under Local SGD `weights` reads the live model.)"""
        if trainer.step == 0:
            return
        rewritten = (self.local_sgd and self.scored_versions is not None
                     and self.scored_versions != self._versions(self.weights()))
        if self.last_scored != trainer.step or rewritten:
            self.score(trainer, trainer.step)

    @staticmethod
    def _versions(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return tuple(tensor._version for tensor in state.values())  # shared with the live parameters

    def score(self, trainer: Trainer, step: int) -> dict[str, Any] | None:
        """The row written (None on a rank that does not evaluate)."""
        from ling_train.eval_model import ling_eval_model, model_from_state

        state = self.weights()
        self.last_scored = step
        if state is None:
            return None
        self.scored_versions = self._versions(state)
        model = model_from_state(self.model_config, state, trainer.device)
        with trainer.autocast():
            results = evaluate(ling_eval_model(model), self.tokenizer, self.tasks, seed=self.seed,
                               batch_size=self.batch_size, limit=self.limit, keep_predictions=False)
        row = {**eval_row(step, results), "eval_weights": self.label}
        self.write(row)
        log.info("step %d eval: %s", step, ", ".join(f"{r.task} {r.primary}={r.score:.4f}" for r in results))
        return row
