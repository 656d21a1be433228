"""`tokenize`: documents -> zstd token shards + manifest, in parallel worker processes.

The main process reads documents and groups them into chunks of about ``shard_chars``
characters; each chunk becomes one shard, encoded, compressed, hashed and written by a worker
process (so only text crosses the process boundary). Shards are written into a temp
directory that is renamed onto ``OUT`` once the manifest is complete: a failure (bad input,
a crash) leaves no partial shard directory behind. Shards are numbered in input order, so the
output does not depend on the number of workers.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ling_data.atomic import atomic_directory
from ling_data.errors import DataError
from ling_data.readers import ReadStats, read_documents
from ling_data.shards import FORMAT, MANIFEST_FILE, TOKENIZER_FILE, dtype_for_vocab, encode_shard
from ling_data.tokenizer import Tokenizer

_worker_tokenizer: Tokenizer | None = None  # one per worker process, set by _init_worker


def tokenize_to_shards(
    inputs: Iterable[str | os.PathLike[str]],
    tokenizer_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int = 1,
    shard_chars: int = 16 << 20,
    skip_bad: bool = False,
    progress: bool = True,
    zstd_level: int = 3,
) -> dict[str, Any]:
    """Tokenize the documents of ``inputs`` into ``out_dir``; returns the manifest.

    Raises:
        DataError: a bad input file (naming ``file:line``) or tokenizer; nothing is written.
    """
    tokenizer = Tokenizer.load(tokenizer_path)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    out = Path(out_dir)
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not a shard directory; choose an empty or new --out")
    started = time.perf_counter()
    stats = ReadStats()
    chunks = _chunks(read_documents(inputs, skip_bad=skip_bad, stats=stats), shard_chars)
    with contextlib.ExitStack() as stack:
        # The pool first: a progress bar may start a monitor thread, which rules out fork.
        pool = stack.enter_context(_pool(Path(tokenizer_path), workers))
        temp = stack.enter_context(atomic_directory(out))
        bar = stack.enter_context(tqdm(desc="tokenize", unit=" tok", unit_scale=True, disable=not progress))
        entries = []
        for entry in _encode_chunks(chunks, pool, 2 * workers, temp, dtype, zstd_level):
            entries.append(entry)
            bar.update(entry["tokens"])
        if not entries:
            raise DataError(f"{', '.join(map(str, inputs))}: no non-empty documents to tokenize")
        shutil.copyfile(tokenizer_path, temp / TOKENIZER_FILE)
        manifest = {
            "format": FORMAT,
            "dtype": dtype,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id,
            "pad_id": tokenizer.pad_id,
            "tokenizer": TOKENIZER_FILE,
            "tokens": sum(e["tokens"] for e in entries),
            "documents": sum(e["documents"] for e in entries),
            "read": stats.as_dict(),
            "seconds": round(time.perf_counter() - started, 3),
            "shards": entries,
        }
        (temp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _chunks(documents: Iterator, shard_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for document in documents:
        chunk.append(document.text)
        size += len(document.text)
        if size >= shard_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@contextlib.contextmanager
def _pool(tokenizer_path: Path, workers: int) -> Iterator[Any]:
    """A process pool of ``workers`` encoders, or ``None`` to encode in this process."""
    if workers <= 1:
        _init_worker(tokenizer_path)
        yield None
        return
    context = multiprocessing.get_context(_start_method())
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        yield pool


def _encode_chunks(chunks: Iterator[list[str]], pool: Any, in_flight: int, out: Path, dtype: str,
                   level: int) -> Iterator[dict[str, Any]]:
    """Shard entries in chunk order; at most ``in_flight`` chunks queued (bounded memory)."""
    numbered = ((f"shard-{index:05d}.zst", chunk) for index, chunk in enumerate(chunks))
    if pool is None:
        for name, chunk in numbered:
            yield _encode_shard(name, chunk, out, dtype, level)
        return
    pending: collections.deque = collections.deque()
    for name, chunk in numbered:
        pending.append(pool.apply_async(_encode_shard, (name, chunk, out, dtype, level)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _start_method() -> str:
    """``fork`` where it is safe and cheap (Linux, no other threads, torch not loaded: the
    ``ling-data`` command); else ``spawn``, which re-imports ling-data in each worker (~1 s)."""
    if sys.platform == "linux" and threading.active_count() == 1 and "torch" not in sys.modules:
        return "fork"
    return "spawn"


def _init_worker(tokenizer_path: Path) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _token_arrays(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-document token counts and all tokens, encoded by this process's tokenizer."""
    ids = _worker_tokenizer.encode_batch(texts, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.uint32, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum(dtype=np.int64)))
    return lengths, tokens


def _encode_shard(name: str, texts: list[str], out: Path, dtype: str, level: int) -> dict[str, Any]:
    lengths, tokens = _token_arrays(texts)
    data = encode_shard(lengths, tokens, dtype, level)
    (out / name).write_bytes(data)
    return {"file": name, "documents": len(texts), "tokens": len(tokens), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


write_shards = tokenize_to_shards  # the name DESIGN.md uses
