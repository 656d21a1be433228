"""Tokenize documents into zstd-compressed token shards with a JSON manifest (tokens,
documents, dtype and sha256 per shard), in parallel worker processes. The output directory
appears complete or not at all; it also holds a copy of the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help=".txt/.jsonl/.jsonl.zst files or directories of them")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model (from train-tokenizer)")
    parser.add_argument("--out", required=True, help="shard directory to write")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    parser.add_argument("--shard-mb", type=float, default=16.0,
                        help="text per shard in millions of characters (default 16)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it already exists (default: refuse)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad input lines instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ling_data.errors import DataError, refuse_to_replace
    from ling_data.tokenize import tokenize_to_shards

    if args.workers < 1:
        raise DataError(f"--workers {args.workers}; expected a positive number of processes")
    if args.shard_mb <= 0:
        raise DataError(f"--shard-mb {args.shard_mb}; expected a positive size")
    refuse_to_replace(args.out, args.overwrite)
    manifest = tokenize_to_shards(args.inputs, args.tokenizer, args.out, workers=args.workers,
                                  shard_chars=max(int(args.shard_mb * 1_000_000), 1),
                                  skip_bad=args.skip_bad, progress=not args.no_progress)
    print(json.dumps({"out": args.out, "shards": len(manifest["shards"]), "documents": manifest["documents"],
                      "tokens": manifest["tokens"], "seconds": manifest["seconds"]}))
    return 0
