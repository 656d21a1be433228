"""Anomaly detectors: each looks at one step (its metrics, the model output) and returns the
anomalies it sees, with the statistic that triggered them.

They read the host values `Trainer.train_step` already synced (loss, grad_norm, max_expert_load,
dead_experts), so detection adds no device synchronisation on a healthy step, except the router
entropy, read once every `router_every` steps.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Anomaly:
    detector: str  # loss_spike, grad_spike, nonfinite, expert_collapse, router_collapse
    statistic: dict[str, Any] = field(default_factory=dict)
    batches: int = 1  # how many of the latest batches are implicated (the current one alone, usually)


class RobustWindow:
    """Robust z-score of a new value against the last `size` values, made for a metric that trends
    (a loss falling fast early in training): the level is the median of the latest `recent` values,
    so the trend does not lag it, and the noise scale comes from the MAD of step-to-step
    differences, so the trend itself is not counted as noise. Medians, not means, so one earlier
    spike in the window cannot inflate the scale and hide the next one."""

    MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation

    def __init__(self, size: int, recent: int = 5):
        self.values: deque[float] = deque(maxlen=size)
        self.recent = recent

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        self.values.append(value)

    def zscore(self, value: float) -> tuple[float, float, float]:
        """(z, level, scale) of `value` against the window (at least 3 values)."""
        values = list(self.values)
        level = statistics.median(values[-self.recent:])
        diffs = [b - a for a, b in zip(values, values[1:])]
        center = statistics.median(diffs)
        # differences of two independent noises have sqrt(2) x their standard deviation
        scale = self.MAD_TO_STD * statistics.median(abs(d - center) for d in diffs) / math.sqrt(2)
        scale = max(scale, 1e-6 * max(abs(level), 1.0))
        return (value - level) / scale, level, scale

    def state_dict(self) -> list[float]:
        return list(self.values)

    def load_state_dict(self, values: list[float]) -> None:
        self.values.clear()
        self.values.extend(values)


class NonFinite:
    """NaN/Inf in the loss or in any gradient (a non-finite gradient makes the clipped total norm
    non-finite, so `grad_norm` covers every parameter's gradient at no extra cost)."""

    def check(self, metrics: dict[str, Any]) -> list[Anomaly]:
        bad = {k: metrics[k] for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])}
        return [Anomaly("nonfinite", {k: str(v) for k, v in bad.items()})] if bad else []


def weights_finite(model: nn.Module) -> bool:
    """One reduction over all parameters (a single device sync)."""
    params = [p.detach() for p in model.parameters()]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=1.0)))


class Spike:
    """Upward spike of a metric against a rolling robust window: z above `z_threshold` and the value
    past `min_excess(median)`. `log=True` scores log(value) (gradient norms vary by factors)."""

    def __init__(self, name: str, metric: str, window: int, min_history: int, z_threshold: float,
                 min_rise: float = 0.0, min_ratio: float = 1.0, log: bool = False):
        self.name, self.metric = name, metric
        self.window = RobustWindow(window)
        self.min_history, self.z_threshold = min_history, z_threshold
        self.min_rise, self.min_ratio, self.log = min_rise, min_ratio, log

    def check(self, metrics: dict[str, Any]) -> list[Anomaly]:
        value = metrics[self.metric]
        if len(self.window) < max(self.min_history, 3) or not math.isfinite(value) or value <= 0 and self.log:
            return []
        scored = math.log(value) if self.log else value
        z, median, scale = self.window.zscore(scored)
        center = math.exp(median) if self.log else median
        if z > self.z_threshold and value >= center * self.min_ratio + self.min_rise:
            return [Anomaly(self.name, {self.metric: value, "z": round(z, 2), "median": center,
                                        "window": len(self.window)})]
        return []

    def accept(self, metrics: dict[str, Any]) -> None:
        """Add a healthy step's value to the window (anomalous steps never enter it)."""
        value = metrics[self.metric]
        if math.isfinite(value) and (value > 0 or not self.log):
            self.window.add(math.log(value) if self.log else value)


class ExpertCollapse:
    """Expert-load collapse: the busiest expert gets `max_load` x the mean tokens (from the
    trainer's `max_expert_load`), or an expert gets no tokens for `dead_steps` steps in a row.
    The idle counters live on the device; they are read only on steps where the trainer's
    `dead_experts` count says some expert got nothing."""

    def __init__(self, max_load: float, dead_steps: int):
        self.max_load, self.dead_steps = max_load, dead_steps
        self.idle_steps: torch.Tensor | None = None  # [layers, experts] consecutive steps without tokens

    def check(self, metrics: dict[str, Any], tokens_per_expert: torch.Tensor | None) -> list[Anomaly]:
        found = []
        if self.max_load and metrics.get("max_expert_load", 0.0) > self.max_load:
            found.append(Anomaly("expert_collapse", {"max_expert_load": metrics["max_expert_load"],
                                                     "threshold": self.max_load}))
        if self.dead_steps and tokens_per_expert is not None and tokens_per_expert.numel():
            idle = tokens_per_expert == 0
            if self.idle_steps is None or self.idle_steps.shape != idle.shape:
                self.idle_steps = torch.zeros_like(tokens_per_expert)
            self.pending = (self.idle_steps + 1) * idle  # committed by accept(): a skipped step never counts
            if metrics.get("dead_experts", 1) > 0:
                # == not >=: one event when an expert reaches the limit, not one per step after
                dead = (self.pending == self.dead_steps).nonzero().tolist()
                if dead:
                    found.append(Anomaly("expert_collapse", {
                        "dead_experts": [{"layer": layer, "expert": expert} for layer, expert in dead],
                        "idle_steps": self.dead_steps}, batches=self.dead_steps))
        return found

    def accept(self) -> None:
        if getattr(self, "pending", None) is not None:
            self.idle_steps = self.pending

    def state_dict(self) -> dict:
        return {"idle_steps": None if self.idle_steps is None else self.idle_steps.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.idle_steps = state["idle_steps"]
        self.pending = None


class RouterEntropy:
    """Router entropy collapse: mean per-token entropy of the router's softmax, over log(E), below
    `min_normalized`. Measured by forward hooks on the router modules (any module with a `weight`
    [experts, hidden] and `num_experts`, ling_core's `Router`), recomputing the fp32 logits from
    the router's input under no_grad: ling-core does not return the probabilities. The hooks
    compute only on armed steps (every `every` steps), and the value is read in one sync."""

    def __init__(self, min_normalized: float, every: int):
        self.min_normalized, self.every = min_normalized, every
        self.armed = False
        self.entropies: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def attach(self, model: nn.Module, router_type: type) -> None:
        for name, module in model.named_modules():
            if isinstance(module, router_type):
                self.handles.append(module.register_forward_hook(self._hook))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def arm(self, step: int) -> None:
        self.armed = bool(self.handles) and step % self.every == 0
        self.entropies.clear()

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.armed:
            return
        with torch.no_grad():
            logits = F.linear(args[0].float(), module.weight.float())
            log_probs = logits.log_softmax(dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1).mean()
            self.entropies.append(entropy / math.log(module.weight.shape[0]))

    def check(self) -> list[Anomaly]:
        if not self.armed or not self.entropies:
            return []
        per_layer = torch.stack(self.entropies).tolist()
        self.entropies.clear()
        low = [i for i, value in enumerate(per_layer) if value < self.min_normalized]
        if low:
            return [Anomaly("router_collapse", {"normalized_entropy": [round(v, 4) for v in per_layer],
                                                "layers": low, "threshold": self.min_normalized})]
        return []
