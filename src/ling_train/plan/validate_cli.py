"""`ling-plan validate`: the planner's memory and step-time predictions against this CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_validate(args: argparse.Namespace) -> str:
    from tqdm import tqdm

    from ling_train.plan.validate import default_cases, validate, validation_markdown

    cases = default_cases()
    with tqdm(total=len(cases), unit="case") as bar:
        rows, mfu, peak = validate(cases, steps=args.steps, progress=bar)
    text = validation_markdown(rows, mfu, peak)
    if args.out:
        from ling_core.hf_io import write_text_atomic
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "validation.md", text)
        write_text_atomic(directory / "validation.jsonl", "".join(
            json.dumps({**vars(r), "memory_error": r.memory_error, "step_error": r.step_error}) + "\n" for r in rows))
    return text


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="predicted vs measured memory and step time on this CPU")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case, after 2 warmup steps (default 5)")
    p.add_argument("--out", help="directory for validation.md and validation.jsonl")
    p.set_defaults(handler=run_validate)
