"""The comparison across device classes: a markdown table and a PNG, plus what-if sensitivity."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from ling_core import LingConfig

from ling_train.plan.cost import Plan, cheapest
from ling_train.plan.devices import Cluster, DeviceTable
from ling_train.plan.memory import GIB, PRECISIONS, Precision
from ling_train.plan.timing import Assumptions


def describe_layout(plan: Plan) -> str:
    lay = plan.layout
    parts = [f"fsdp {lay.fsdp}", f"ep {lay.ep}"]
    if lay.replicas > 1:
        parts.append(f"{lay.replicas} Local SGD replicas")
    parts.append(f"mb {lay.micro_batch}")
    if lay.recompute:
        parts.append("recompute")
    return ", ".join(parts)


def money(x: float, currency: str) -> str:
    amount = f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:,.2f}"
    return f"{amount} {currency}".strip()


def duration(days: float) -> str:
    return f"{days:.1f} days" if days >= 1 else f"{days * 24:.2g} h"


def comparison_markdown(rows: list[tuple[Cluster, Plan | None, Plan | None]], currency: str,
                        references: dict[str, float] | None = None) -> str:
    references = references or {}
    header = ["cluster", "device", "devices", "cheapest layout", "memory/device", "step", "tokens/s",
              "achieved MFU", "time", "cost"]
    if references:
        header += ["reference cost", "ours vs reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cluster, best, closest in rows:
        device = cluster.device
        if best is None:
            why = closest.why_infeasible if closest is not None else "no layout tiles the cluster"
            cells = [cluster.name, device.name, str(cluster.count), f"infeasible: {why}"] + [""] * (len(header) - 4)
        else:
            cells = [cluster.name, device.name, str(cluster.count), describe_layout(best),
                     f"{best.memory.total / GIB:.1f} / {device.memory_gib:g} GiB",
                     f"{best.step.step_s:.2f} s", f"{best.step.tokens_per_s:,.0f}", f"{best.step.mfu:.1%}",
                     duration(best.days), money(best.cost, currency)]
            if references:
                ref = references.get(cluster.name, references.get(device.name))
                cells += ([money(ref, currency), f"{best.cost / ref - 1:+.0%}"] if ref else ["", ""])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def memory_markdown(plan: Plan) -> str:
    m = plan.memory.as_gib()
    rows = [("weights (sharded, fp32)", m["weights"]), ("gradients", m["gradients"]),
            ("optimizer (AdamW moments)", m["optimizer"]), ("Local SGD anchor + momentum", m["local_sgd"]),
            ("gathered layers (FSDP buffers)", m["fsdp_buffers"]),
            ("activations, no recomputation", m["activations_without_recompute"]),
            ("activations, full recomputation", m["activations_with_recompute"]),
            ("of which routed experts' states", m["expert_states"]),
            (f"total ({'with' if plan.layout.recompute else 'without'} recomputation)", m["total"])]
    lines = ["| per device | GiB |", "|---|---|"] + [f"| {k} | {v:,.2f} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def implied_mfu(config: LingConfig, cluster: Cluster, target_cost: float, tokens: float, seq_len: int,
                global_batch_tokens: int, assumptions: Assumptions, precision: Precision) -> float | None:
    """The assumed per-device MFU at which our cheapest plan costs `target_cost` (bisection;
    cost falls as MFU rises). None when no MFU in [1%, 100%] reaches it."""
    device = dataclasses.replace(cluster.device, mfu=None)
    cluster = dataclasses.replace(cluster, device=device)

    def cost(mfu: float) -> float:
        best, _ = cheapest(config, cluster, tokens, seq_len, global_batch_tokens,
                           dataclasses.replace(assumptions, mfu=mfu), precision)
        return best.cost if best is not None else float("inf")

    low, high = 0.01, 1.0
    if not cost(high) <= target_cost <= cost(low):
        return None
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) > target_cost else (low, mid)
    return (low + high) / 2


def sensitivity_markdown(config: LingConfig, table: DeviceTable, tokens: float, seq_len: int,
                         global_batch_tokens: int, assumptions: Assumptions,
                         precision: Precision = PRECISIONS["bf16-mixed"]) -> str:
    """Cost of the cheapest plan per cluster as one assumption moves at a time."""
    cases = [("as assumed", assumptions),
             ("MFU 0.3", dataclasses.replace(assumptions, mfu=0.3)),
             ("MFU 0.5", dataclasses.replace(assumptions, mfu=0.5)),
             ("links x0.5", dataclasses.replace(assumptions, bandwidth_scale=assumptions.bandwidth_scale * 0.5)),
             ("links x2", dataclasses.replace(assumptions, bandwidth_scale=assumptions.bandwidth_scale * 2)),
             ("no overlap", dataclasses.replace(assumptions, overlap=0.0, edit_overlap=0.0)),
             ("free communication", dataclasses.replace(assumptions, bandwidth_scale=1e6))]
    header = ["cluster"] + [name for name, _ in cases]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cluster in table.clusters:
        cells = [cluster.name]
        for _, case in cases:
            best, _ = cheapest(config, cluster, tokens, seq_len, global_batch_tokens, case, precision)
            cells.append(money(best.cost, table.currency) if best else "infeasible")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_png_atomic(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def comparison_png(rows: list[tuple[Cluster, Plan | None, Plan | None]], currency: str, path: Path,
                   title: str, references: dict[str, float] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = references or {}
    feasible = [(c, p) for c, p, _ in rows if p is not None]
    names = [c.name for c, _ in feasible]
    fig, (ax_cost, ax_days) = plt.subplots(1, 2, figsize=(10, 4))
    bars = ax_cost.bar(names, [p.cost / 1e6 for _, p in feasible], color="tab:blue", label="planner estimate")
    ax_cost.bar_label(bars, fmt="%.2f")
    ref_x = [i for i, (c, _) in enumerate(feasible) if references.get(c.name, references.get(c.device.name))]
    ref_y = [references.get(feasible[i][0].name, references.get(feasible[i][0].device.name)) / 1e6 for i in ref_x]
    if ref_x:
        ax_cost.scatter(ref_x, ref_y, color="tab:red", marker="_", s=900, linewidths=3, label="reference", zorder=3)
    ax_cost.set_ylabel(f"cost (M {currency})")
    ax_cost.set_title("cost of the cheapest feasible layout")
    ax_cost.legend(loc="lower left", fontsize="small")
    ax_days.bar(names, [p.days for _, p in feasible], color="tab:green")
    ax_days.set_ylabel("days")
    ax_days.set_title("wall-clock days")
    fig.suptitle(title)
    save_png_atomic(fig, path)
    plt.close(fig)
