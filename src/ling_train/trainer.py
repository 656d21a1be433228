"""A small trainer: one loop, behaviour added through callbacks (OLMo-core's shape).

The loop knows nothing of logging, checkpoints or progress bars; those are callbacks with hooks
`on_train_start`, `pre_step`, `skip_update`, `post_step`, `on_checkpoint`, `on_error`,
`on_train_end` and `before_state_rewrite`, so features (anomaly handling, in-training eval, Local SGD) plug in without
threading flags through the loop. A callback with `state_dict`/`load_state_dict` is saved and
resumed with the trainer.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ling_kernels.allocator import keep_freed_memory_for_training


class Callback:
    """Hooks called by `Trainer.fit`; override what you need."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def pre_step(self, trainer: "Trainer", step: int) -> None: ...
    def skip_update(self, trainer: "Trainer", step: int, metrics: dict[str, Any], output: Any) -> bool:
        """Called after backward and gradient clipping, before the optimizer step, with this step's
        metrics and the model output; return True to drop the update (weights, optimizer state and
        LR schedule stay untouched, `step` does not advance and `post_step` is not called)."""
        return False
    def post_step(self, trainer: "Trainer", step: int, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", step: int, path: Any) -> None: ...
    def on_error(self, trainer: "Trainer", error: BaseException) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...
    def before_state_rewrite(self, trainer: "Trainer", to_step: int) -> None:
        """Called (through `Trainer.before_state_rewrite`) before a callback rewrites weights or
        optimizer state in place outside `optimizer.step()` (an anomaly rollback to `to_step`), so
        a background copy of that state (a flash snapshot) can finish reading it first."""


IGNORE_INDEX = -100  # a label that carries no loss (ling-kernels' cross-entropy skips it)


class Loader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(input_ids, labels) or, for packed SFT rows, (input_ids, labels, segment_ids)."""
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def clip_local_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """torch's clipping over the module's own gradients; returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


@dataclass
class TrainerSettings:
    total_steps: int
    grad_clip: float = 1.0
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16; None = full precision
    # (model, max_norm) -> norm before clipping; expert parallel swaps in a global-norm version
    clip_gradients: Callable[[torch.nn.Module, float], torch.Tensor] = clip_local_grad_norm


class Trainer:
    """Trains `model` whose forward(input_ids, labels[, segment_ids=...]) returns an object with `.loss` (and
    optionally `.lm_loss`, `.balance_loss`, `.router_z_loss`, `.tokens_per_expert`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, loader: Loader,
                 settings: TrainerSettings, device: torch.device, callbacks: list[Callback] = ()):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loader = loader
        self.settings = settings
        self.device = device
        self.callbacks = list(callbacks)
        self.step = 0  # number of completed optimizer steps
        self.should_stop = False  # a callback may set this to end training after the current step

    def autocast(self):
        """The autocast context of the training step (a no-op in full precision); evaluation reuses it."""
        dtype = self.settings.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> dict[str, Any]:
        self.model.train()
        start = time.perf_counter()
        input_ids, labels, *extra = (part.to(self.device, non_blocking=True) for part in self.loader.next_batch())
        packed = {"segment_ids": extra[0]} if extra else {}  # SFT rows: several samples per row
        with self.autocast():
            out = self.model(input_ids, labels, **packed)
        out.loss.backward()
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        grad_norm = self.settings.clip_gradients(self.model, clip)
        # The metric .item()s come before the update so a callback can veto it on their values.
        metrics: dict[str, Any] = {"loss": out.loss.item(), "lr": self.optimizer.param_groups[0]["lr"],
                                   "grad_norm": grad_norm.item(),
                                   "tokens": input_ids.numel()}
        if packed:  # what the loss is computed on; the rest (prompts, tool results, padding) is context
            metrics["target_tokens"] = int((labels != IGNORE_INDEX).sum().item())
        for name in ("lm_loss", "balance_loss", "router_z_loss"):
            value = getattr(out, name, None)
            if value is not None:
                metrics[name] = value.item()
        for name, value in getattr(out, "metrics", {}).items():  # an objective's own (ling_train.dpo)
            metrics[name] = value.item()
        tokens_per_expert = getattr(out, "tokens_per_expert", None)
        if tokens_per_expert is not None and tokens_per_expert.numel():
            load = tokens_per_expert.float()
            metrics["max_expert_load"] = (load.max(dim=1).values / load.mean(dim=1)).max().item()
            metrics["dead_experts"] = int((tokens_per_expert == 0).sum().item())
        if any([cb.skip_update(self, self.step + 1, metrics, out) for cb in self.callbacks]):
            metrics["skipped"] = True
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics["step_time_s"] = time.perf_counter() - start
        return metrics

    def fit(self) -> None:
        if self.device.type == "cpu":  # before the first step, so its log line comes before the progress bar
            keep_freed_memory_for_training()
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            while self.step < self.settings.total_steps and not self.should_stop:
                for cb in self.callbacks:
                    cb.pre_step(self, self.step + 1)
                metrics = self.train_step()
                if metrics.get("skipped"):
                    continue
                self.step += 1
                for cb in self.callbacks:
                    cb.post_step(self, self.step, metrics)
        except BaseException as error:
            for cb in self.callbacks:
                cb.on_error(self, error)
            raise
        # Teardown in reverse order, so a callback ending late (a final checkpoint) still finds
        # the ones registered before it (the metrics file) open.
        for cb in reversed(self.callbacks):
            cb.on_train_end(self)

    def before_state_rewrite(self, to_step: int) -> None:
        """Tell every callback that the state is about to go back to `to_step`, rewritten in place
        (see Callback)."""
        for cb in self.callbacks:
            cb.before_state_rewrite(self, to_step)

    # --- resumable state (everything but the weights, which are saved in HF layout) ---
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks
                          if hasattr(cb, "state_dict")},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        for cb in self.callbacks:
            if type(cb).__name__ in state.get("callbacks", {}):
                cb.load_state_dict(state["callbacks"][type(cb).__name__])
