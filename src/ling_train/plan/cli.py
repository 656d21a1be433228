"""`ling-plan`: plan a run before renting anything. Tables on stdout, progress on stderr.

Exit codes: 0 success, 2 bad input (one line naming the flag/file and what was expected),
1 internal error.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  ling-plan cost --size plus --tokens 1T --devices examples/ling_report_devices.toml
  ling-plan cost --size plus --tokens 1T --devices examples/ling_report_devices.toml \\
      --reference D=6.35e6 --reference A,B,C,E=5.08e6 --sensitivity --out plan/
  ling-plan cost --size lite --tokens 300B --devices my.toml --fsdp 8 --ep 8   # one layout
  ling-plan validate                   # predicted vs measured memory and step time, this CPU
  ling-plan sweep --out sweep/         # small lr x batch x compute grid of tiny models (CPU)
  ling-plan fit sweep/runs.jsonl --budget 1e15   # power laws, suggested --lr / --batch-size
"""


class UsageError(Exception):
    pass


_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(flag: str, text: str) -> float:
    """'1e12', '1T', '300B', '4M' -> a positive number."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMBGT]?)\s*", text)
    try:
        value = float(match.group(1)) * _SUFFIX.get(match.group(2), 1.0) if match else None
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise UsageError(f"{flag}: expected a positive number such as 1e12, 1T or 300B, got {text!r}")
    return value


def parse_references(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        names, sep, cost = item.partition("=")
        if not sep or not names:
            raise UsageError(f"--reference: expected NAME[,NAME...]=COST, got {item!r}")
        value = parse_count("--reference", cost)
        for name in names.split(","):
            out[name.strip()] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ling-plan", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    cost = sub.add_parser("cost", help="memory, time and cost of a run on each device class",
                          epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cost.add_argument("--size", help="model preset: tiny, lite or plus (default plus)")
    cost.add_argument("--config", help="a run config TOML ([model] overrides) or an HF config.json")
    cost.add_argument("--tokens", default="1T", help="training tokens (default 1T)")
    cost.add_argument("--seq-len", type=int, default=4096, dest="seq_len", help="default 4096")
    cost.add_argument("--global-batch", default="4194304", dest="global_batch",
                      help="tokens per optimizer step across all devices (default 4194304 = 2^22)")
    cost.add_argument("--devices", required=True, help="device table TOML (see examples/)")
    cost.add_argument("--mfu", type=float, default=0.4,
                      help="assumed MFU of the compute, for devices without their own `mfu` (default 0.4)")
    cost.add_argument("--overlap", type=float, default=0.8,
                      help="fraction of compute FSDP traffic hides behind (default 0.8)")
    cost.add_argument("--sync-every", type=int, default=100, dest="sync_every",
                      help="Local SGD steps between syncs (default 100)")
    cost.add_argument("--bandwidth-scale", type=float, default=1.0, dest="bandwidth_scale",
                      help="multiply every link's bandwidth (what-if; default 1)")
    cost.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"])
    layout = cost.add_argument_group("one fixed layout instead of the search (on every cluster)")
    layout.add_argument("--fsdp", type=int, help="FSDP group size")
    layout.add_argument("--ep", type=int, help="expert-parallel degree")
    layout.add_argument("--replicas", type=int, help="Local SGD replicas")
    layout.add_argument("--micro-batch", type=int, dest="micro_batch", help="sequences per device per pass")
    layout.add_argument("--recompute", action="store_true", help="full activation recomputation")
    cost.add_argument("--reference", action="append", default=[], metavar="NAME=COST",
                      help="a published cost to compare with, per cluster or device name (repeatable)")
    cost.add_argument("--sensitivity", action="store_true", help="also tabulate cost under other assumptions")
    cost.add_argument("--out", help="directory for plan.md and plan.png")

    from ling_train.plan import scaling_cli, validate_cli
    validate_cli.add_parser(sub)
    scaling_cli.add_parsers(sub)

    return p


def model_config(args: argparse.Namespace):
    from ling_core import LingConfig, preset
    if args.config:
        if args.config.endswith(".json"):
            return f"config {args.config}", LingConfig.from_json_file(args.config)
        from ling_train.config import load_toml, resolve
        config = resolve(load_toml(args.config), {"size": args.size}, source=args.config)
        return f"{config.size} + {args.config}", config.model_config(args.config)
    size = args.size or "plus"
    return size, preset(size)


def run_cost(args: argparse.Namespace) -> str:
    from ling_train.plan.cost import plan_layout, plan_table
    from ling_train.plan.devices import load_device_table
    from ling_train.plan.memory import PRECISIONS, Layout
    from ling_train.plan.report import (comparison_markdown, comparison_png, describe_layout, duration,
                                        memory_markdown, money, sensitivity_markdown)
    from ling_train.plan.timing import Assumptions

    name, config = model_config(args)
    tokens = parse_count("--tokens", args.tokens)
    global_batch = int(parse_count("--global-batch", args.global_batch))
    if args.seq_len < 1:
        raise UsageError(f"--seq-len: expected >= 1, got {args.seq_len}")
    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu: expected a fraction in (0, 1], got {args.mfu}")
    if not 0 <= args.overlap <= 1:
        raise UsageError(f"--overlap: expected a fraction in [0, 1], got {args.overlap}")
    if args.sync_every < 1 or args.bandwidth_scale <= 0:
        raise UsageError("--sync-every must be >= 1 and --bandwidth-scale > 0")
    table = load_device_table(args.devices)
    references = parse_references(args.reference)
    assumptions = Assumptions(mfu=args.mfu, overlap=args.overlap, sync_every=args.sync_every,
                              bandwidth_scale=args.bandwidth_scale)
    precision = PRECISIONS[args.precision]
    title = f"{name}: {tokens:.3g} tokens, seq {args.seq_len}, global batch {global_batch:,} tokens"
    out = [f"# ling-plan: {title}", "",
           f"assumed MFU {args.mfu:g} (unless the table sets one per device), FSDP overlap "
           f"{args.overlap:g}, Local SGD sync every {args.sync_every} steps, link bandwidth x"
           f"{args.bandwidth_scale:g}, {precision.name}", ""]
    fixed = any(v is not None for v in (args.fsdp, args.ep, args.replicas, args.micro_batch)) or args.recompute
    if fixed:
        for cluster in table.clusters:
            layout = Layout(cluster.count, args.fsdp or 1, args.ep or 1, args.replicas or 1,
                            args.micro_batch or 1, args.recompute)
            plan = plan_layout(config, cluster, layout, tokens, args.seq_len, global_batch, assumptions, precision)
            verdict = "fits" if plan.feasible else f"infeasible: {plan.why_infeasible}"
            out += [f"## {cluster.name} ({cluster.count} x {cluster.device.name}): {verdict}", "",
                    memory_markdown(plan),
                    f"step {plan.step.step_s:.3f} s (compute {plan.step.compute_s:.3f}, FSDP/HSDP traffic "
                    f"{plan.step.fsdp_s:.3f}, expert all-to-all {plan.step.expert_all_to_all_s:.3f}, Local SGD "
                    f"{plan.step.local_sgd_s:.3f}); {plan.step.tokens_per_s:,.0f} tokens/s; achieved MFU "
                    f"{plan.step.mfu:.1%}; {duration(plan.days)}; {money(plan.cost, table.currency)}", ""]
        return "\n".join(out)
    logging.getLogger("ling_train").info("searching layouts on %d clusters", len(table.clusters))
    rows = plan_table(config, table, tokens, args.seq_len, global_batch, assumptions, precision)
    out += ["## cheapest feasible layout per cluster", "", comparison_markdown(rows, table.currency, references)]
    for cluster, best, _ in rows:
        if best is not None:
            out += [f"### {cluster.name}: memory per device ({describe_layout(best)})", "", memory_markdown(best)]
    if references:
        from ling_train.plan.report import implied_mfu
        out += ["## assumed MFU that would reproduce each reference cost", "",
                "| cluster | reference | implied MFU |", "|---|---|---|"]
        for cluster in table.clusters:
            ref = references.get(cluster.name, references.get(cluster.device.name))
            if ref:
                mfu = implied_mfu(config, cluster, ref, tokens, args.seq_len, global_batch, assumptions, precision)
                out.append(f"| {cluster.name} | {ref / 1e6:.2f}M | {'n/a' if mfu is None else f'{mfu:.2f}'} |")
        out.append("")
    if args.sensitivity:
        out += ["## cost as one assumption moves", "",
                sensitivity_markdown(config, table, tokens, args.seq_len, global_batch, assumptions, precision)]
    text = "\n".join(out)
    if args.out:
        from ling_core.hf_io import write_text_atomic
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "plan.md", text)
        comparison_png(rows, table.currency, directory / "plan.png", title, references)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from ling_core import ConfigError
    from ling_train.config import RunConfigError
    from ling_train.plan.devices import DeviceTableError
    from ling_train.plan.scaling_cli import SweepError
    from ling_train.scaling import FitError

    bad_input = (UsageError, ConfigError, RunConfigError, DeviceTableError, FitError, SweepError)
    try:
        text = args.handler(args) if hasattr(args, "handler") else run_cost(args)
    except bad_input as e:
        print(f"ling-plan: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
