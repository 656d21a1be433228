"""ling-data: the data side of Ling pretraining.

Documents from ``.txt``/``.jsonl``/``.jsonl.zst`` files (or the embedded offline corpus),
Unicode normalisation, quality filters, exact and MinHash near-dedup, a byte-fallback
sentencepiece tokenizer with the chat/tool-call symbols, zstd token shards with a checksummed
manifest, and resumable, rank-sharded loaders. Imports nothing from other ling packages.

Names are imported lazily, so ``ling-data`` commands and worker processes that only need the
readers or the tokenizer do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "ling_data.errors",
    "Document": "ling_data.readers",
    "read_documents": "ling_data.readers",
    "embedded_corpus": "ling_data.corpus",
    "read_text_documents": "ling_data.corpus",
    "FilterConfig": "ling_data.filters",
    "normalize": "ling_data.filters",
    "Deduplicator": "ling_data.dedup",
    "MinHasher": "ling_data.dedup",
    "NearDuplicateIndex": "ling_data.dedup",
    "PrepareConfig": "ling_data.preparation",
    "prepare": "ling_data.preparation",
    "CHAT_TEMPLATE_SYMBOLS": "ling_data.tokenizer",
    "Tokenizer": "ling_data.tokenizer",
    "cached_tokenizer": "ling_data.tokenizer",
    "tokenize_to_shards": "ling_data.tokenize",
    "write_shards": "ling_data.tokenize",
    "load_manifest": "ling_data.shards",
    "is_shard_dir": "ling_data.shards",
    "PackedLoader": "ling_data.packing",
    "pack_documents": "ling_data.packing",
    "TokenLoader": "ling_data.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ling_data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
