"""`tokenize_to_shards` against a simple reference: encode every document, cut shards where the
running character count reaches `shard_chars`, encode each shard. The pieces handed to workers
(`chunk_chars`) and the number of workers must not change a byte of the output."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ling_data.shards import encode_shard, load_manifest
from ling_data.tokenize import tokenize_to_shards

TEXTS = st.lists(st.text(st.characters(exclude_categories=("Cs",)), min_size=0, max_size=300), min_size=1,
                 max_size=25)


def reference_entries(texts: list[str], tokenizer, shard_chars: int) -> list[dict]:
    shards, shard, size = [], [], 0
    for text in filter(str.strip, texts):  # the readers skip blank documents
        shard.append(tokenizer.encode(text))
        size += len(text)
        if size >= shard_chars:
            shards.append(shard)
            shard, size = [], 0
    shards += [shard] if shard else []
    entries = []
    for index, documents in enumerate(shards):
        lengths = np.array([len(d) for d in documents], dtype=np.uint32)
        tokens = np.array([t for d in documents for t in d], dtype=np.int64)
        data = encode_shard(lengths, tokens, "uint16")
        entries.append({"file": f"shard-{index:05d}.zst", "documents": len(documents), "tokens": len(tokens),
                        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return entries


def tokenize(texts: list[str], tokenizer, root: Path, **options) -> list[dict]:
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tokenize_to_shards([source], tokenizer.model_path, root / "shards", progress=False, **options)
    return load_manifest(root / "shards")["shards"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=TEXTS, shard_chars=st.integers(1, 3000), chunk_chars=st.integers(1, 2000))
def test_shards_match_reference_for_any_piece_size(small_tokenizer, texts, shard_chars, chunk_chars) -> None:
    expected = reference_entries(texts, small_tokenizer, shard_chars)
    with tempfile.TemporaryDirectory() as root:
        if not expected:
            with pytest.raises(ValueError, match="no non-empty documents"):
                tokenize(texts, small_tokenizer, Path(root), shard_chars=shard_chars, chunk_chars=chunk_chars)
            return
        assert tokenize(texts, small_tokenizer, Path(root), shard_chars=shard_chars,
                        chunk_chars=chunk_chars) == expected


@pytest.mark.dist
@pytest.mark.parametrize(("shard_chars", "chunk_chars"), [(16 << 20, 5000), (20_000, 3000), (4000, 50_000)])
def test_two_workers_write_the_reference_shards(small_tokenizer, corpus, tmp_path, shard_chars, chunk_chars) -> None:
    texts = corpus[:60]
    assert tokenize(texts, small_tokenizer, tmp_path, workers=2, shard_chars=shard_chars,
                    chunk_chars=chunk_chars) == reference_entries(texts, small_tokenizer, shard_chars)
