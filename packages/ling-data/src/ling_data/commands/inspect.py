"""Summarise a token shard directory (manifest totals, per-shard sizes, compression) and
decode the start of a document, verifying the checksum of every shard read (--verify: all).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="shard directory written by `ling-data tokenize`")
    parser.add_argument("--document", type=int, default=0, help="which document to decode (default 0)")
    parser.add_argument("--chars", type=int, default=300, help="characters of the sample to show (default 300)")
    parser.add_argument("--verify", action="store_true", help="read and verify every shard")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ling_data.errors import DataError
    from ling_data.shards import load_manifest, read_shard
    from ling_data.tokenizer import Tokenizer

    directory = Path(args.directory)
    manifest = load_manifest(directory)
    shards = manifest["shards"]
    compressed = sum(entry.get("bytes", 0) for entry in shards)
    if args.verify:
        for entry in shards:
            read_shard(directory, entry, manifest["dtype"])
    if not 0 <= args.document < manifest["documents"]:
        raise DataError(f"--document {args.document}; expected an index in [0, {manifest['documents']})")
    index = args.document
    for entry in shards:
        if index < entry["documents"]:
            break
        index -= entry["documents"]
    shard = read_shard(directory, entry, manifest["dtype"])
    start = int(shard.lengths[:index].sum())
    ids = shard.tokens[start:start + int(shard.lengths[index])]
    tokenizer = Tokenizer.load(directory / manifest["tokenizer"])
    summary = {
        "directory": str(directory), "shards": len(shards), "documents": manifest["documents"],
        "tokens": manifest["tokens"], "dtype": manifest["dtype"], "vocab_size": manifest["vocab_size"],
        "compressed_bytes": compressed,
        "bytes_per_token": round(compressed / max(manifest["tokens"], 1), 3),
        "tokens_per_document": round(manifest["tokens"] / max(manifest["documents"], 1), 1),
        "verified": "all shards" if args.verify else f"{entry['file']}",
        "sample": {"document": args.document, "tokens": len(ids),
                   "text": tokenizer.decode(ids.tolist())[: args.chars]},
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
