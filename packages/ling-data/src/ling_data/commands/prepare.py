"""Read .txt/.jsonl/.jsonl.zst documents, normalise Unicode, apply quality filters, drop exact
and near duplicates (MinHash + LSH), and write OUT/documents.jsonl.zst and OUT/report.json.

Filters are set in a TOML file (keys of ling_data.filters.FilterConfig; `false` disables one):
  min_chars = 100
  max_digit_ratio = false
  max_top_ngram_fraction = {2 = 0.25, 3 = 0.2}
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help=".txt/.jsonl/.jsonl.zst files or directories of them")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--normalization", choices=("NFC", "NFKC", "none"), default="NFC",
                        help="Unicode normal form (default NFC)")
    parser.add_argument("--filters", metavar="TOML", help="filter thresholds (see above); default: built-in")
    parser.add_argument("--no-filters", action="store_true", help="disable every quality filter")
    parser.add_argument("--near-dup-threshold", type=float, default=0.8,
                        help="MinHash Jaccard threshold for near duplicates (default 0.8; 0 disables)")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    parser.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count in the report) bad lines instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ling_data.errors import DataError
    from ling_data.filters import FilterConfig
    from ling_data.preparation import PrepareConfig, prepare

    filters = FilterConfig()
    if args.no_filters:
        filters = FilterConfig.from_dict({name: False for name in vars(FilterConfig())}, "--no-filters")
    elif args.filters:
        try:
            values = tomllib.loads(Path(args.filters).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"--filters: {args.filters} does not exist; expected a TOML file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"--filters: {args.filters}: invalid TOML ({error})") from None
        filters = FilterConfig.from_dict(values, args.filters)
    if not 0 <= args.near_dup_threshold <= 1:
        raise DataError(f"--near-dup-threshold {args.near_dup_threshold}; expected a Jaccard similarity in [0, 1]")
    if args.num_perm < 2:
        raise DataError(f"--num-perm {args.num_perm}; expected at least 2")
    config = PrepareConfig(
        normalization=args.normalization, filters=filters, exact_dedup=not args.no_exact_dedup,
        near_dedup_threshold=args.near_dup_threshold or None, num_perm=args.num_perm, skip_bad=args.skip_bad)
    report = prepare(args.inputs, args.out, config, progress=not args.no_progress)
    print(json.dumps({k: report[k] for k in ("read", "dropped", "kept", "output")}, indent=2))
    return 0
