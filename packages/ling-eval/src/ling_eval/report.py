"""Results of one or more checkpoints -> JSON, a markdown report and PNG plots (score vs step
with confidence bands). Files are written to a temp name and renamed, so none is left half."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ling_eval.evaluate import METRICS, TaskResult
from ling_eval.stats import Comparison, paired_comparison


@dataclass
class CheckpointResults:
    checkpoint: str
    step: int | None
    results: list[TaskResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "step": self.step, "results": [r.to_dict() for r in self.results]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CheckpointResults":
        return cls(data["checkpoint"], data["step"], [TaskResult.from_dict(r) for r in data["results"]])


def compare_results(a: TaskResult, b: TaskResult, metric: str | None = None, seed: int = 0) -> Comparison:
    """Paired comparison of two results of the same task on the items they share."""
    if a.sha256 != b.sha256:
        raise ValueError(f"{a.task}: results come from different task files ({a.sha256[:12]} vs {b.sha256[:12]})")
    metric = metric or a.primary
    index_b = {item_id: i for i, item_id in enumerate(b.item_ids)}
    shared = [(i, index_b[item_id]) for i, item_id in enumerate(a.item_ids) if item_id in index_b]
    num_a, den_a = a.item_scores[metric]
    num_b, den_b = b.item_scores[metric]
    pick = lambda values, which: [values[pair[which]] for pair in shared]  # noqa: E731
    return paired_comparison(metric, pick(num_a, 0), pick(den_a, 0), pick(num_b, 1), pick(den_b, 1),
                             METRICS[a.kind][metric].transform, seed=seed)


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def summary(runs: list[CheckpointResults]) -> dict[str, Any]:
    """The compact result: per checkpoint, per task, the primary score with its interval."""
    return {"checkpoints": [
        {"checkpoint": run.checkpoint, "step": run.step,
         "scores": {r.task: {"metric": r.primary, "value": r.score, "ci_low": r.metrics[r.primary].ci_low,
                             "ci_high": r.metrics[r.primary].ci_high} for r in run.results}}
        for run in runs]}


def markdown_report(runs: list[CheckpointResults], comparisons: list[Comparison] = ()) -> str:
    lines = ["# ling-eval report", ""]
    tasks = [r.task for r in runs[0].results] if runs else []
    for t, task in enumerate(tasks):
        first = runs[0].results[t]
        names = list(first.metrics)
        lines += [f"## {task} ({first.kind})", "",
                  f"{first.num_items} items, {first.num_fewshot}-shot, seed {first.seed}, "
                  f"file `{first.path}` sha256 `{first.sha256[:16]}`; 95% bootstrap intervals. "
                  f"Primary metric: **{first.primary}**.", "",
                  "| checkpoint | step | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for run in runs:
            result = run.results[t]
            cells = [f"{m.value:.4f} [{m.ci_low:.4f}, {m.ci_high:.4f}]" if (m := result.metrics.get(n)) else "-"
                     for n in names]
            lines.append(f"| `{Path(run.checkpoint).name}` | {run.step if run.step is not None else '-'} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if comparisons:
        lines += ["## Paired comparison (first vs last checkpoint)", ""]
        lines += [f"- {c.summary()}" for c in comparisons]
        lines.append("")
    return "\n".join(lines)


def plot_scores(runs: list[CheckpointResults], directory: Path) -> list[Path]:
    """One PNG per task: primary score vs step (checkpoint order when steps are unknown), with
    the 95% interval as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for t, first in enumerate(runs[0].results if runs else []):
        xs = [run.step if run.step is not None else i for i, run in enumerate(runs)]
        metrics = [run.results[t].metrics[first.primary] for run in runs]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(xs, [m.value for m in metrics], marker="o")
        ax.fill_between(xs, [m.ci_low for m in metrics], [m.ci_high for m in metrics], alpha=0.25,
                        label="95% bootstrap CI")
        ax.set_xlabel("training step" if all(run.step is not None for run in runs) else "checkpoint")
        ax.set_ylabel(first.primary + ("" if first.metrics[first.primary].higher_is_better else " (lower is better)"))
        ax.set_title(f"{first.task} ({first.num_items} items, {first.num_fewshot}-shot)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = directory / f"eval_{first.task}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def write_report(runs: list[CheckpointResults], out: Path, comparisons: list[Comparison] = (),
                 plots_dir: Path | None = None) -> dict[str, Path]:
    """out/results.json (everything, per-item scores included), out/report.md, and
    eval_<task>.png plots in `plots_dir` (default out/plots)."""
    full = {"runs": [run.to_dict() for run in runs],
            "comparisons": [{**c.__dict__, "difference": c.difference.__dict__} for c in comparisons]}
    write_atomic(out / "results.json", (json.dumps(full, indent=1) + "\n").encode())
    write_atomic(out / "report.md", markdown_report(runs, comparisons).encode())
    plots = plot_scores(runs, plots_dir or out / "plots")
    return {"results": out / "results.json", "report": out / "report.md", **{p.stem: p for p in plots}}
