"""Train a byte-fallback sentencepiece tokenizer (BPE or unigram) on documents.

Ids 0-3 are pad, unk, bos, eos; the chat/tool-call symbols (<|im_start|> <|im_end|>
<tool_call> </tool_call> <tool_response> </tool_response>) follow as single tokens unless
--no-chat-symbols is given.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help=".txt/.jsonl/.jsonl.zst files or directories of them")
    parser.add_argument("--out", required=True, help="where to write the .model file")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="default bpe")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling lines of very large corpora")
    parser.add_argument("--no-chat-symbols", action="store_true", help="leave out the chat/tool-call symbols")
    parser.add_argument("--symbol", action="append", default=[], metavar="TEXT",
                        help="another user-defined symbol (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it already exists (default: refuse)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad input lines instead of stopping")


def run(args: argparse.Namespace) -> int:
    from ling_data.errors import DataError, refuse_to_replace
    from ling_data.readers import read_documents
    from ling_data.tokenizer import CHAT_TEMPLATE_SYMBOLS, Tokenizer

    refuse_to_replace(args.out, args.overwrite)
    symbols = ([] if args.no_chat_symbols else list(CHAT_TEMPLATE_SYMBOLS)) + args.symbol
    documents = [document.text for document in read_documents(args.inputs, skip_bad=args.skip_bad)]
    if not documents:
        raise DataError(f"{' '.join(args.inputs)}: no non-empty documents to train on")
    try:
        tokenizer = Tokenizer.train(documents, args.vocab_size, args.out, model_type=args.model_type,
                                    seed=args.seed, user_defined_symbols=symbols)
    except ValueError as error:
        raise DataError(f"--vocab-size {args.vocab_size}: {str(error).splitlines()[0]}") from None
    print(json.dumps({"model": args.out, "vocab_size": tokenizer.vocab_size, "model_type": args.model_type,
                      "documents": len(documents), "user_defined_symbols": symbols}))
    return 0
