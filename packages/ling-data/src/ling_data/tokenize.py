"""`tokenize`: documents -> zstd token shards + manifest, in parallel worker processes.

The main process reads documents and cuts them into *pieces* of about ``chunk_chars``
characters, the unit of work: a worker process encodes a piece and sends back its token
counts and tokens as numpy arrays (already in the shard dtype, so 2 bytes a token cross the
pipe). Shards are a separate, larger unit (about ``shard_chars`` characters): the main
process concatenates a shard's pieces and a writer thread compresses, hashes and writes it
while the workers encode on. Small pieces keep every worker busy to the end of the job, and
the shard size stays a choice about files, not about parallelism: a 10 MB job with 16 MB
shards still uses every worker. Shard boundaries depend only on the documents and
``shard_chars``, so the output is byte-identical for any number of workers and any
``chunk_chars``.

Shards are written into a temp directory that is renamed onto ``OUT`` once the manifest is
complete: a failure (bad input, a crash) leaves no partial shard directory behind.
"""

from __future__ import annotations

import collections
import concurrent.futures
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

# The unit of work handed to a worker: ~0.1 s of sentencepiece encoding, so the last piece
# of a job leaves the other workers idle for at most that long, while the per-piece cost
# (pickling, a pipe round trip: well under a millisecond) stays below 1%.
CHUNK_CHARS = 1 << 19
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
    chunk_chars: int = CHUNK_CHARS,
) -> dict[str, Any]:
    """Tokenize the documents of ``inputs`` into ``out_dir``; returns the manifest.

    ``workers`` processes encode pieces of about ``chunk_chars`` characters; a shard closes
    after the document that brings it to ``shard_chars`` characters. Neither ``workers`` nor
    ``chunk_chars`` changes the output.

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
    pieces = _pieces(read_documents(inputs, skip_bad=skip_bad, stats=stats), shard_chars, max(chunk_chars, 1))
    with contextlib.ExitStack() as stack:
        # The pool first: the writer thread would rule out fork.
        pool = stack.enter_context(_pool(Path(tokenizer_path), workers))
        temp = stack.enter_context(atomic_directory(out))
        writer = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1, "ling-data-shard-writer"))
        bar = stack.enter_context(_ProgressBar(desc="tokenize", unit=" tok", unit_scale=True, disable=not progress))
        encoded = _encode_pieces(pieces, pool, 4 * workers, dtype, bar)
        entries = list(_write_shards(encoded, writer, temp, dtype, zstd_level))
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


class _ProgressBar(tqdm):
    """tqdm without its monitor thread: tqdm starts one on first use (even when disabled) and
    leaves it running, which would make every later call in this process spawn its workers."""

    monitor_interval = 0


def _pieces(documents: Iterator, shard_chars: int, chunk_chars: int) -> Iterator[tuple[list[str], bool]]:
    """(texts, closes_a_shard) in document order. A shard closes after the document that
    brings it to ``shard_chars`` characters; within a shard, a piece closes at ``chunk_chars``."""
    piece: list[str] = []
    shard_size = piece_size = 0
    for document in documents:
        piece.append(document.text)
        shard_size += len(document.text)
        piece_size += len(document.text)
        if shard_size >= shard_chars:
            yield piece, True
            piece, shard_size, piece_size = [], 0, 0
        elif piece_size >= chunk_chars:
            yield piece, False
            piece, piece_size = [], 0
    if shard_size:
        yield piece, True


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


def _encode_pieces(pieces: Iterator[tuple[list[str], bool]], pool: Any, in_flight: int, dtype: str,
                   bar: tqdm) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
    """(lengths, tokens, closes_a_shard) per piece, in order; at most ``in_flight`` pieces are
    queued at the workers (bounded memory, and enough queued that no worker waits)."""
    if pool is None:
        results = ((_token_arrays(texts, dtype), closes) for texts, closes in pieces)
    else:
        results = _in_order(((pool.apply_async(_token_arrays, (texts, dtype)), closes) for texts, closes in pieces),
                            in_flight)
    for (lengths, tokens), closes in results:
        bar.update(len(tokens))
        yield lengths, tokens, closes


def _in_order(submitted: Iterator[tuple[Any, bool]], in_flight: int) -> Iterator[tuple[Any, bool]]:
    pending: collections.deque = collections.deque()
    for result, closes in submitted:
        pending.append((result, closes))
        if len(pending) >= in_flight:
            result, closes = pending.popleft()
            yield result.get(), closes
    while pending:
        result, closes = pending.popleft()
        yield result.get(), closes


def _write_shards(encoded: Iterator[tuple[np.ndarray, np.ndarray, bool]], writer: concurrent.futures.Executor,
                  out: Path, dtype: str, level: int) -> Iterator[dict[str, Any]]:
    """Manifest entries in shard order. Each shard is compressed, hashed and written on the
    ``writer`` thread (zstd and hashlib release the GIL) while the next pieces are encoded;
    at most two shards wait there, so memory stays bounded."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    writing: collections.deque = collections.deque()
    for index in itertools.count():
        for lengths, tokens, closes in encoded:
            parts.append((lengths, tokens))
            if closes:
                break
        else:
            break
        writing.append(writer.submit(_write_shard, out / f"shard-{index:05d}.zst", parts, dtype, level))
        parts = []
        if len(writing) > 2:
            yield writing.popleft().result()
    while writing:
        yield writing.popleft().result()


def _write_shard(path: Path, parts: list[tuple[np.ndarray, np.ndarray]], dtype: str, level: int) -> dict[str, Any]:
    lengths = np.concatenate([p[0] for p in parts])
    tokens = np.concatenate([p[1] for p in parts])
    data = encode_shard(lengths, tokens, dtype, level)
    path.write_bytes(data)
    return {"file": path.name, "documents": len(lengths), "tokens": len(tokens), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _start_method() -> str:
    """``fork`` where it is safe and cheap (Linux, no other threads, torch not loaded: the
    ``ling-data`` command; torch stands in for native thread pools that threading cannot
    see); else ``spawn``, which starts a fresh interpreter per worker that imports
    ``ling_data.tokenize`` (~0.2 s idle, over a second on a loaded machine). ``forkserver``
    was no faster here for a single pool (its server is a fresh interpreter too)."""
    if sys.platform == "linux" and threading.active_count() == 1 and "torch" not in sys.modules:
        return "fork"
    return "spawn"


def _init_worker(tokenizer_path: Path) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _token_arrays(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-document token counts (uint32) and all tokens (``dtype``), encoded by this
    process's tokenizer: what one piece sends back to the main process."""
    ids = _worker_tokenizer.encode_batch(texts, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.uint32, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum(dtype=np.int64)))
    return lengths, tokens


write_shards = tokenize_to_shards  # the name DESIGN.md uses
