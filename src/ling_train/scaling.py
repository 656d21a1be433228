"""Scaling-law fits: loss vs compute, and the optimal learning rate and batch size vs compute.

The Ling report (following DeepSeek LLM) grid-searched batch size B and learning rate eta over
compute budgets and fitted B_opt = a C^b and eta_opt = a C^b. Here a fit is ordinary least
squares on log y = log a + b log C; confidence intervals come from the fit covariance (t-based)
for the loss law and from a bootstrap over runs for the optimum laws, where the optimum of each
budget is itself re-chosen in every resample.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class FitError(ValueError):
    """Not enough (or malformed) runs to fit."""


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x ** exponent, with a confidence interval on the exponent."""
    coefficient: float
    exponent: float
    exponent_ci: tuple[float, float]
    coefficient_ci: tuple[float, float]
    points: int

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent

    def describe(self, name: str, x: str = "C") -> str:
        lo, hi = self.exponent_ci
        return f"{name} = {self.coefficient:.4g} * {x}^{self.exponent:+.4f}  (exponent 95% CI [{lo:+.4f}, {hi:+.4f}], {self.points} points)"


# Two-sided 97.5% Student-t quantiles for small samples (scipy-free); normal beyond.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _t975(dof: int) -> float:
    if dof <= 0:
        return math.inf
    keys = [k for k in _T975 if k <= dof]
    return _T975[max(keys)] if dof <= 30 else 1.96


def _ols_log(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(params [log a, b], covariance) of log y = log a + b log x."""
    design = np.column_stack([np.ones_like(x), np.log(x)])
    target = np.log(y)
    params, *_ = np.linalg.lstsq(design, target, rcond=None)
    dof = len(x) - 2
    residual = target - design @ params
    sigma2 = float(residual @ residual) / dof if dof > 0 else math.inf
    cov = sigma2 * np.linalg.inv(design.T @ design)
    return params, cov


def fit_power_law(x, y) -> PowerLaw:
    """Least squares in log-log space; the 95% CIs come from the fit covariance."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise FitError("x and y must be 1-D and the same length")
    if len(x) < 3:
        raise FitError(f"a power law needs at least 3 points, got {len(x)}")
    if (x <= 0).any() or (y <= 0).any():
        raise FitError("power-law fits need positive x and y")
    if len(np.unique(x)) < 2:
        raise FitError("all x are equal: nothing to fit")
    params, cov = _ols_log(x, y)
    half = _t975(len(x) - 2) * math.sqrt(cov[1, 1])
    half_a = _t975(len(x) - 2) * math.sqrt(cov[0, 0])
    return PowerLaw(float(math.exp(params[0])), float(params[1]), (params[1] - half, params[1] + half),
                    (math.exp(params[0] - half_a), math.exp(params[0] + half_a)), len(x))


@dataclass(frozen=True)
class Run:
    compute: float  # training FLOPs
    lr: float
    batch_tokens: float
    loss: float


def load_runs(path: str | Path) -> list[Run]:
    """One JSON object per line with compute, lr, batch_tokens, loss (what `ling-plan sweep` writes)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FitError(f"{path}: not found (expected a JSONL of runs from ling-plan sweep)") from None
    runs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            run = Run(float(row["compute"]), float(row["lr"]), float(row["batch_tokens"]), float(row["loss"]))
        except json.JSONDecodeError as e:
            raise FitError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        except (KeyError, TypeError, ValueError) as e:
            raise FitError(f"{path}:{number}: expected numbers compute, lr, batch_tokens, loss ({e})") from None
        if not all(math.isfinite(v) and v > 0 for v in (run.compute, run.lr, run.batch_tokens, run.loss)):
            raise FitError(f"{path}:{number}: compute, lr, batch_tokens and loss must be finite and > 0")
        runs.append(run)
    return runs


def _vertex(values: list[float], losses: list[float], best: float) -> float:
    """The minimum of a parabola through loss vs log(value), kept inside the grid: a coarse grid's
    best point only says "somewhere near here"; the parabola places the optimum between points.
    Falls back to the grid's best when there are < 3 points or the parabola does not open up."""
    if len(set(values)) < 3:
        return best
    x = np.log(np.asarray(values, dtype=float))
    a, b, _ = np.polyfit(x, np.asarray(losses, dtype=float), 2)
    if a <= 0:
        return best
    return float(np.exp(np.clip(-b / (2 * a), x.min(), x.max())))


def budget_optimum(group: list[Run]) -> Run:
    """One budget's optimum: the lowest-loss run, with lr refined along its batch's lr sweep and
    batch refined along its lr's batch sweep (each by `_vertex`)."""
    best = min(group, key=lambda r: r.loss)
    same_batch = [r for r in group if r.batch_tokens == best.batch_tokens]
    same_lr = [r for r in group if r.lr == best.lr]
    lr = _vertex([r.lr for r in same_batch], [r.loss for r in same_batch], best.lr)
    batch = _vertex([r.batch_tokens for r in same_lr], [r.loss for r in same_lr], best.batch_tokens)
    return Run(best.compute, lr, batch, best.loss)


def optima(runs: list[Run]) -> list[Run]:
    """The optimum of each compute budget (see `budget_optimum`), budgets in increasing order."""
    by_budget: dict[float, list[Run]] = defaultdict(list)
    for run in runs:
        by_budget[run.compute].append(run)
    return [budget_optimum(group) for _, group in sorted(by_budget.items())]


@dataclass(frozen=True)
class ScalingFit:
    loss: PowerLaw  # best loss per budget vs compute
    lr: PowerLaw  # optimal learning rate vs compute
    batch_tokens: PowerLaw  # optimal batch (tokens) vs compute
    optima: list[Run]

    def suggest(self, compute: float) -> dict[str, float]:
        return {"compute": compute, "lr": float(self.lr(compute)),
                "batch_tokens": float(self.batch_tokens(compute)), "loss": float(self.loss(compute))}


def _bootstrap_exponent_ci(runs: list[Run], field: str, resamples: int, seed: int) -> tuple[float, float] | None:
    rng = np.random.default_rng(seed)
    by_budget: dict[float, list[Run]] = defaultdict(list)
    for run in runs:
        by_budget[run.compute].append(run)
    budgets = sorted(by_budget)
    exponents = []
    for _ in range(resamples):
        best = []
        for budget in budgets:
            group = by_budget[budget]
            sample = [group[i] for i in rng.integers(0, len(group), len(group))]
            best.append(budget_optimum(sample))
        x = np.array([r.compute for r in best])
        y = np.array([getattr(r, field) for r in best])
        params, _ = _ols_log(x, y)
        exponents.append(params[1])
    low, high = np.percentile(exponents, [2.5, 97.5])
    return float(low), float(high)


def fit_scaling(runs: list[Run], resamples: int = 1000, seed: int = 0) -> ScalingFit:
    """Fit the three laws. Optimum laws get bootstrap CIs (runs resampled within each budget)."""
    best = optima(runs)
    if len(best) < 3:
        raise FitError(f"need runs at >= 3 compute budgets, got {len(best)}")
    x = [r.compute for r in best]
    loss = fit_power_law(x, [r.loss for r in best])
    laws = {}
    for field in ("lr", "batch_tokens"):
        law = fit_power_law(x, [getattr(r, field) for r in best])
        ci = _bootstrap_exponent_ci(runs, field, resamples, seed)
        # The bootstrap interval covers the noise in picking each budget's optimum; the covariance
        # interval covers scatter about the line. Report the wider envelope of the two.
        lo, hi = min(ci[0], law.exponent_ci[0]), max(ci[1], law.exponent_ci[1])
        laws[field] = PowerLaw(law.coefficient, law.exponent, (lo, hi), law.coefficient_ci, law.points)
    return ScalingFit(loss, laws["lr"], laws["batch_tokens"], best)


def plot_fit(fit: ScalingFit, runs: list[Run], path: Path, budget: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from ling_train.plan.report import save_png_atomic

    compute = np.array([r.compute for r in runs])
    grid = np.geomspace(compute.min() / 1.5, max(compute.max(), budget or 0) * 1.5, 50)
    best_x = np.array([r.compute for r in fit.optima])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("loss", fit.loss, "final loss"), ("lr", fit.lr, "learning rate"),
              ("batch_tokens", fit.batch_tokens, "batch (tokens)")]
    for ax, (field, law, label) in zip(axes, panels):
        ax.scatter(compute, [getattr(r, field) for r in runs], s=12, color="0.7", label="runs")
        ax.scatter(best_x, [getattr(r, field) for r in fit.optima], color="tab:red", label="best per budget")
        ax.plot(grid, law(grid), color="tab:blue", label=f"fit: exponent {law.exponent:+.3f}")
        lo, hi = law.exponent_ci
        pivot = float(np.exp(np.log(best_x).mean()))  # draw the CI band pivoting at the data's centre
        ax.fill_between(grid, law(pivot) * (grid / pivot) ** lo, law(pivot) * (grid / pivot) ** hi,
                        color="tab:blue", alpha=0.15, label="95% CI (exponent)")
        if budget:
            ax.axvline(budget, color="tab:green", linestyle="--", label="budget")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a narrow log axis
        ax.set_xlabel("compute (FLOPs)")
        ax.set_ylabel(label)
        ax.legend(fontsize="x-small")
    fig.suptitle("scaling fits")
    save_png_atomic(fig, path)
    plt.close(fig)
