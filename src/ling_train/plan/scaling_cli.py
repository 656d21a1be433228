"""`ling-plan sweep` (runs for the scaling fits, through the normal training code) and
`ling-plan fit` (power laws, confidence intervals, suggested --lr / --batch-size)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from ling_train.scaling import fit_scaling, load_runs, plot_fit


class SweepError(ValueError):
    """Bad sweep request (flags or an existing output directory)."""


# A tiny-width MoE (dense first layer, 4 experts top-2, shared expert) so a sweep fits on a CPU.
SWEEP_MODEL = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "num_experts": 4,
               "num_experts_per_tok": 2, "num_shared_experts": 1, "moe_intermediate_size": 64,
               "first_k_dense_replace": 1}


def sweep_grid(budgets: int, base_tokens: int, batches: list[int], lrs: list[float], seq_len: int):
    """(name, steps, batch, lr, tokens) per run: budget i trains on base_tokens * 2^i tokens."""
    grid = []
    for i in range(budgets):
        tokens = base_tokens * 2 ** i
        for batch in batches:
            steps = max(1, round(tokens / (batch * seq_len)))
            for lr in lrs:
                grid.append((f"c{i}-b{batch}-lr{lr:g}", steps, batch, lr, steps * batch * seq_len))
    return grid


def final_loss(metrics_path: Path, tail: float = 0.1) -> float:
    """Mean lm_loss over the last `tail` of the logged steps (at least 5): one step is noisy."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    losses = [r["lm_loss"] for r in rows if "event" not in r]
    count = max(5, int(len(losses) * tail))
    return sum(losses[-count:]) / len(losses[-count:])


def run_sweep(args: argparse.Namespace) -> str:
    from tqdm import tqdm

    from ling_core import flops_per_token, preset
    from ling_train.config import RunConfig
    from ling_train.run import train

    out = Path(args.out)
    results = out / "runs.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.exists() else set()
    batches = [int(b) for b in args.batches.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    if args.budgets < 3 or min(batches) < 1 or min(lrs) <= 0:
        raise SweepError("--budgets must be >= 3 (a power law needs 3 points), batches >= 1, lrs > 0")
    model_config = preset("tiny").replace(**SWEEP_MODEL)
    fpt = flops_per_token(model_config, args.seq_len)
    grid = sweep_grid(args.budgets, args.base_tokens, batches, lrs, args.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    with open(results, "a", buffering=1) as sink, tqdm(total=len(grid), initial=len(done), unit="run") as bar:
        for name, steps, batch, lr, tokens in grid:
            if name in done:
                continue
            run_dir = out / "runs" / name
            shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run of ours: start it again
            config = RunConfig(size="tiny", steps=steps, seq_len=args.seq_len, batch_size=batch, lr=lr,
                               warmup_steps=max(1, steps // 10), out=str(run_dir), device="cpu",
                               precision="fp32", checkpoint_every=0, seed=args.seed, model=dict(SWEEP_MODEL))
            config.validate("sweep")
            summary = train(config, progress=False)
            row = {"name": name, "compute": fpt * tokens, "lr": lr, "batch_tokens": batch * args.seq_len,
                   "batch_size": batch, "steps": steps, "tokens": tokens,
                   "loss": final_loss(run_dir / "metrics.jsonl"), "wall_time_s": summary["wall_time_s"]}
            sink.write(json.dumps(row) + "\n")  # one line per finished run: a rerun resumes
            if not args.keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            bar.update(1)
    return f"{len(grid)} runs in {results}; fit them with: ling-plan fit {results} --seq-len {args.seq_len}"


def run_fit(args: argparse.Namespace) -> str:
    from ling_train.plan.cli import parse_count

    runs = load_runs(args.runs)
    fit = fit_scaling(runs, resamples=args.resamples)
    lines = [f"# scaling fits from {args.runs} ({len(runs)} runs, {len(fit.optima)} budgets)", "",
             fit.loss.describe("loss"), fit.lr.describe("lr_opt"), fit.batch_tokens.describe("batch_opt (tokens)"), ""]
    lines += ["| compute | best loss | lr_opt | batch_opt (tokens) |", "|---|---|---|---|"]
    lines += [f"| {r.compute:.3g} | {r.loss:.3f} | {r.lr:.3g} | {r.batch_tokens:,.0f} |" for r in fit.optima]
    lines.append("")
    for r in fit.optima:
        group = [x for x in runs if x.compute == r.compute]
        for field, flag in (("lr", "--lrs"), ("batch_tokens", "--batches")):
            grid = [getattr(x, field) for x in group]
            if any(math.isclose(getattr(r, field), edge, rel_tol=1e-6) for edge in (min(grid), max(grid))):
                lines.append(f"note: at C = {r.compute:.3g} the {field} optimum is at the grid's edge "
                             f"({getattr(r, field):.3g}); widen {flag} for a trustworthy fit")
    budget = parse_count("--budget", args.budget) if args.budget else None
    if budget:
        s = fit.suggest(budget)
        batch_size = max(1, 2 ** round(math.log2(s["batch_tokens"] / args.seq_len)))
        extrapolated = budget > max(r.compute for r in runs) * 10 or budget < min(r.compute for r in runs) / 10
        lines += [f"for C = {budget:.3g} FLOPs: lr {s['lr']:.3g}, batch {s['batch_tokens']:,.0f} tokens, "
                  f"expected loss {s['loss']:.3f}",
                  f"suggested flags: --lr {s['lr']:.3g} --batch-size {batch_size} --seq-len {args.seq_len}"
                  + ("  (extrapolated more than 10x beyond the runs: treat with care)" if extrapolated else "")]
    if args.out:
        from ling_core.hf_io import write_text_atomic
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        plot_fit(fit, runs, directory / "fit.png", budget)
        write_text_atomic(directory / "fit.md", "\n".join(lines) + "\n")
    return "\n".join(lines)


def add_parsers(sub) -> None:
    sweep = sub.add_parser("sweep", help="train a small lr x batch x compute grid of tiny models (CPU)")
    sweep.add_argument("--out", required=True, help="sweep directory (runs.jsonl; rerun to resume)")
    sweep.add_argument("--budgets", type=int, default=3, help="compute budgets, each 2x the last (default 3)")
    sweep.add_argument("--base-tokens", type=int, default=40960, dest="base_tokens",
                       help="training tokens of the smallest budget (default 40960)")
    sweep.add_argument("--batches", default="4,8,16", help="batch sizes in sequences (default 4,8,16)")
    sweep.add_argument("--lrs", default="0.001,0.003,0.01", help="learning rates (default 0.001,0.003,0.01)")
    sweep.add_argument("--seq-len", type=int, default=64, dest="seq_len")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--keep-checkpoints", action="store_true", dest="keep_checkpoints")
    sweep.set_defaults(handler=run_sweep)

    fit = sub.add_parser("fit", help="fit loss, lr_opt and batch_opt power laws to sweep runs")
    fit.add_argument("runs", help="runs JSONL (compute, lr, batch_tokens, loss per line)")
    fit.add_argument("--budget", help="compute budget in FLOPs to suggest --lr / --batch-size for")
    fit.add_argument("--seq-len", type=int, default=64, dest="seq_len", help="to turn batch tokens into --batch-size")
    fit.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    fit.add_argument("--out", help="directory for fit.png and fit.md")
    fit.set_defaults(handler=run_fit)
