"""ling-data: the data side of Ling pretraining, minimal slice.

An offline corpus (docstrings of the Python standard library) or your own ``.txt``/``.jsonl``
documents, a byte-fallback sentencepiece tokenizer trained once and cached, and a
deterministic, resumable, rank-sharded loader over packed token windows. Imports nothing from
other ling packages.
"""

from ling_data.corpus import embedded_corpus, read_text_documents
from ling_data.errors import DataError
from ling_data.packing import PackedLoader, pack_documents
from ling_data.tokenizer import Tokenizer, cached_tokenizer

__all__ = [
    "DataError",
    "PackedLoader",
    "Tokenizer",
    "cached_tokenizer",
    "embedded_corpus",
    "pack_documents",
    "read_text_documents",
]
