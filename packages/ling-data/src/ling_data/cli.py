"""`ling-data`: prepare documents, train a tokenizer, write token shards, inspect them.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``; adding
one is one line in :data:`COMMANDS`. Progress goes to stderr, results to stdout. Exit codes:
0 success, 2 bad input (one line naming the file/flag and what was expected), 1 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("ling_data.commands.prepare", "normalise, filter and deduplicate documents"),
    "train-tokenizer": ("ling_data.commands.train_tokenizer", "train a sentencepiece tokenizer"),
    "tokenize": ("ling_data.commands.tokenize", "documents -> zstd token shards + manifest"),
    "inspect": ("ling_data.commands.inspect", "summarise a shard directory and decode a sample"),
    "kg": ("ling_data.kg.cli", "synthesise verified tool-use data from a knowledge graph"),
}

EXAMPLES = """\
examples:
  ling-data prepare raw/ --out prepared/                  # filters + dedup, report.json
  ling-data train-tokenizer prepared/ --vocab-size 8192 --out tok.model
  ling-data tokenize prepared/ --tokenizer tok.model --out shards/ --workers 2
  ling-data inspect shards/
  ling-data kg --out kg/                                  # tool-use train/test JSONL + report
  ling-train --data shards/                                # train from the shards
"""


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ling-data", description="The Ling data pipeline.", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from ling_data.errors import DataError

    try:
        return args.run(args)
    except DataError as error:
        print(f"ling-data {args.command}: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ling-data {args.command}: interrupted; nothing partial was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
