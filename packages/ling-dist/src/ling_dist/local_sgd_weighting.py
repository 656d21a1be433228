"""How much each worker's pseudo-gradient counts in the average: the plain token-weighted mean
(DiLoCo) and EDiT's pseudo-gradient penalty.

Both take what every rank reported at the sync point (tokens and inner steps since the last
sync, the norm of its pseudo-gradient) and return one weight per rank plus a scale for the
averaged pseudo-gradient. Every rank calls them on the same gathered numbers in float64, so every
rank computes bitwise the same weights without another message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SyncWeights:
    weights: list[float]  # per rank; sums to 1, or all 0 when every worker was excluded
    excluded: list[int] = field(default_factory=list)  # ranks whose pseudo-gradient got weight 0
    scale: float = 1.0  # multiplies the averaged pseudo-gradient (clipping)
    # per rank: the statistic outliers are judged by (EDiT: the norm's z-score against the rank's
    # EWMA before this sync, 0 while it has fewer than two norms, inf for a non-finite norm);
    # empty for weightings without outlier detection. Anomaly logging reads it from here.
    z_scores: list[float] = field(default_factory=list)


class Weighting(Protocol):
    def weigh(self, tokens: list[int], steps: list[int], norms: list[float]) -> SyncWeights: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _no_tokens_error(steps: list[int]) -> RuntimeError:
    return RuntimeError(f"no rank processed any tokens in the {sum(steps)} inner steps since the last sync, "
                        "so the pseudo-gradients have no weights; pass tokens=")


class TokenWeighting:
    """Weight = this rank's share of the tokens processed since the last sync (DiLoCo)."""

    def weigh(self, tokens: list[int], steps: list[int], norms: list[float]) -> SyncWeights:
        total = sum(tokens)
        if total == 0:
            raise _no_tokens_error(steps)
        return SyncWeights([t / total for t in tokens])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class NormTracker:
    """Exponentially weighted mean and variance of one worker's pseudo-gradient norm.

    The first observation sets the mean (no pull towards 0); the variance starts at 0 and is
    bias-corrected by 1 - (1 - alpha)^(updates), as Adam corrects its moments, so that a small
    alpha does not make the first z-scores huge and flag healthy workers right after warm-up.
    """

    mean: float = 0.0
    variance: float = 0.0
    count: int = 0

    def z_score(self, value: float, alpha: float) -> float:
        if self.count < 2:
            return 0.0
        variance = self.variance / (1.0 - (1.0 - alpha) ** (self.count - 1))
        if variance <= 0.0:
            return 0.0 if value == self.mean else math.copysign(math.inf, value - self.mean)
        return (value - self.mean) / math.sqrt(variance)

    def update(self, value: float, alpha: float) -> None:
        if self.count == 0:
            self.mean = value
        else:
            delta = value - self.mean
            self.mean += alpha * delta
            self.variance = (1.0 - alpha) * (self.variance + alpha * delta * delta)
        self.count += 1


class PseudoGradientPenalty:
    """EDiT's pseudo-gradient penalty (Cheng et al. 2024, arXiv 2412.07210, section 3.2).

    1. Anomaly elimination: each worker's pseudo-gradient norm is tracked by a `NormTracker`
       (EWMA, `ewma_alpha`). After `warmup_syncs` observations, a worker whose norm has a
       z-score above `z_threshold` is an outlier and gets weight 0; so does a non-finite norm,
       even during warm-up. Outliers do not update their tracker, so one spike does not teach
       the tracker that spikes are normal.
    2. Weighted averaging: among the others, weight_i ∝ tokens_i * exp(-norm_i / temperature)
       (a softmax of -norm/temperature combined with the tokens each worker processed): a
       worker that moved less counts more. `temperature=None` keeps plain token weights.
       `step_weight` in [0, 1] blends in each worker's share of the inner steps (A-EDiT).
    3. Clipping: the averaged pseudo-gradient is scaled so that its norm is at most `clip_norm`.
       Its exact norm is known only after every parameter was exchanged, but layer-wise sync
       must update the first layer before the last is exchanged, so the scale is computed from
       the bound ||sum w_i d_i|| <= sum w_i ||d_i|| (triangle inequality), known at the sync
       point. The clipped update never exceeds `clip_norm`; the bound is tight when workers move
       in the same direction and conservative when they disagree.
    """

    def __init__(self, *, ewma_alpha: float = 0.02, warmup_syncs: int = 10, z_threshold: float = 3.0,
                 temperature: float | None = 1.0, clip_norm: float | None = 10.0, step_weight: float = 0.0) -> None:
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha={ewma_alpha}: expected 0 < alpha <= 1")
        if warmup_syncs < 2:
            raise ValueError(f"warmup_syncs={warmup_syncs}: expected >= 2 (a variance needs two norms)")
        if not z_threshold > 0:
            raise ValueError(f"z_threshold={z_threshold}: expected > 0")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature={temperature}: expected > 0, or None for token weights only")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm={clip_norm}: expected > 0, or None for no clipping")
        if not 0.0 <= step_weight <= 1.0:
            raise ValueError(f"step_weight={step_weight}: expected 0 <= step_weight <= 1")
        self.ewma_alpha = ewma_alpha
        self.warmup_syncs = warmup_syncs
        self.z_threshold = z_threshold
        self.temperature = temperature
        self.clip_norm = clip_norm
        self.step_weight = step_weight
        self.trackers: list[NormTracker] = []

    def z_score(self, rank: int, norm: float) -> float:
        """`norm` against the rank's tracker (before it sees `norm`); inf when `norm` is not finite."""
        return self.trackers[rank].z_score(norm, self.ewma_alpha) if math.isfinite(norm) else math.inf

    def is_outlier(self, rank: int, norm: float) -> bool:
        if not math.isfinite(norm):
            return True
        tracker = self.trackers[rank]
        return tracker.count >= self.warmup_syncs and self.z_score(rank, norm) > self.z_threshold

    def weigh(self, tokens: list[int], steps: list[int], norms: list[float]) -> SyncWeights:
        if sum(tokens) == 0:
            raise _no_tokens_error(steps)
        if not self.trackers:
            self.trackers = [NormTracker() for _ in norms]
        if len(self.trackers) != len(norms):
            raise ValueError(f"penalty state tracks {len(self.trackers)} workers, this sync has {len(norms)}")
        z_scores = [self.z_score(rank, norm) for rank, norm in enumerate(norms)]
        excluded = [rank for rank, norm in enumerate(norms) if self.is_outlier(rank, norm)]
        for rank, norm in enumerate(norms):
            if rank not in excluded and steps[rank] > 0:
                self.trackers[rank].update(norm, self.ewma_alpha)
        included = [rank for rank in range(len(norms)) if rank not in excluded]
        raw = [0.0] * len(norms)
        if included:
            smallest = min(norms[rank] for rank in included)
            for rank in included:
                penalty = 1.0 if self.temperature is None else math.exp(-(norms[rank] - smallest) / self.temperature)
                raw[rank] = tokens[rank] * penalty
        total, total_steps = sum(raw), sum(steps[rank] for rank in included)
        if total == 0.0:
            return SyncWeights([0.0] * len(norms), excluded, 0.0, z_scores)
        weights = [(1.0 - self.step_weight) * r / total for r in raw]
        if self.step_weight:
            for rank in included:
                weights[rank] += self.step_weight * steps[rank] / total_steps
        scale = 1.0
        bound = sum(w * n for w, n in zip(weights, norms) if w)
        if self.clip_norm is not None and bound > self.clip_norm:
            scale = self.clip_norm / bound
        return SyncWeights(weights, excluded, scale, z_scores)

    def state_dict(self) -> dict[str, Any]:
        return {"trackers": [(t.mean, t.variance, t.count) for t in self.trackers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trackers = [NormTracker(mean, variance, count) for mean, variance, count in state["trackers"]]
