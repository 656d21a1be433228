"""`TokenLoader`: shuffled, rank-sharded, resumable batches from a token shard directory.

Order of an epoch ``e``: the shards are visited in ``default_rng([seed, e]).permutation``
order; each shard's documents are packed into one stream with EOS after every document and
cut into windows of ``seq_len + 1`` tokens (window ``j`` starts at ``j * seq_len``, the tail
shorter than a window is dropped); the shard's windows are shuffled by
``default_rng([seed, e, shard])``. This epoch-long window sequence is cut into global batches
of ``batch_size * world_size`` windows, of which rank ``r`` takes the ``r``-th
``batch_size``; with per-rank ``batch_sizes`` a global batch is their sum and rank ``r``
takes ``batch_sizes[r]`` windows from ``sum(batch_sizes[:r])`` on (`ling_data.rank_batches`).
The remainder smaller than a global batch is skipped that epoch. Only the
shards the current batch needs are in memory (each rank reads whole shards and keeps its
slice), so memory is bounded by the shard size, not the corpus.

The position is ``(epoch, batch)``, the same on every rank, so :meth:`state_dict` of any rank
restores all of them. A background thread prepares the next ``prefetch`` batches; the state
counts only batches handed out by :meth:`next_batch`, so a resumed loader serves exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ling_data.errors import DataError
from ling_data.rank_batches import check_saved_batch_sizes, global_batch_text, rank_batch_sizes
from ling_data.shards import load_manifest, read_shard

_POLL_SECONDS = 0.1


class TokenLoader:
    """Serve ``(input_ids, labels)`` batches, each ``[batch_size, seq_len]`` int64, forever
    (``batch_size``: this rank's, ``batch_sizes[rank]`` when per-rank sizes are given)."""

    def __init__(self, directory: str | Path, seq_len: int, batch_size: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, prefetch: int = 2,
                 batch_sizes: Sequence[int] | None = None) -> None:
        for name, value in (("seq_len", seq_len), ("world_size", world_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r}; expected a positive int")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}; expected an int in [0, world_size={world_size})")
        self.batch_sizes = rank_batch_sizes(batch_size, batch_sizes, rank, world_size)
        batch_size = self.batch_sizes[rank]
        self.global_batch_size = sum(self.batch_sizes)
        self._first_row = sum(self.batch_sizes[:rank])  # this rank's offset in a global batch
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch={prefetch!r}; expected a non-negative int (0: no background thread)")
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.eos_id = self.manifest["eos_id"]
        self.tokens = self.manifest["tokens"]
        self.documents = self.manifest["documents"]
        shards = self.manifest["shards"]
        self._windows_per_shard = [max(s["tokens"] + s["documents"] - 1, 0) // seq_len for s in shards]
        self.num_windows = sum(self._windows_per_shard)
        self.batches_per_epoch = self.num_windows // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.directory}: {self.tokens} tokens in {len(shards)} shards give {self.num_windows} windows "
                f"of seq_len+1={seq_len + 1} tokens, but {global_batch_text(self.batch_sizes)} needs "
                f"at least {self.global_batch_size}; use more documents or a smaller seq_len/batch_size")
        self.fingerprint = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        self.epoch = 0
        self.batch = 0  # global batches handed out in the current epoch
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()

    # --- the order -------------------------------------------------------------------------
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and the cumulative window counts along it."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._windows_per_shard))
        return order, np.cumsum([self._windows_per_shard[s] for s in order])

    def _rows(self, layout: tuple[np.ndarray, np.ndarray], batch: int) -> Iterator[tuple[int, int]]:
        """(shard, index among that shard's shuffled windows) of each row of this rank's batch."""
        order, ends = layout
        first = batch * self.global_batch_size + self._first_row
        for position in range(first, first + self.batch_size):
            slot = int(np.searchsorted(ends, position, side="right"))
            yield int(order[slot]), position - (int(ends[slot - 1]) if slot else 0)

    def _window_starts(self, shard: int, epoch: int) -> np.ndarray:
        """The start offsets of the shard's windows in its packed stream, in the epoch's order."""
        starts = np.arange(self._windows_per_shard[shard], dtype=np.int64) * self.seq_len
        np.random.default_rng([self.seed, epoch, shard]).shuffle(starts)
        return starts

    def batch_documents(self, epoch: int, batch: int) -> list[list[int]]:
        """For each row of this rank's batch at ``(epoch, batch)``: ``[first, last]``, the documents
        its ``seq_len + 1`` tokens come from, numbered from 0 across the directory in manifest
        order. Reads (and verifies) the shards involved: meant for the few batches an anomaly names."""
        first_document = np.cumsum([0] + [entry["documents"] for entry in self.manifest["shards"]])
        eos_at: dict[int, np.ndarray] = {}  # shard -> offsets of its EOS tokens (one per document)
        starts: dict[int, np.ndarray] = {}  # shard -> its windows' starts in the epoch's order
        spans = []
        for shard, offset in self._rows(self._epoch_layout(epoch), batch):
            if shard not in eos_at:
                lengths = read_shard(self.directory, self.manifest["shards"][shard], self.manifest["dtype"]).lengths
                eos_at[shard] = np.cumsum(lengths.astype(np.int64) + 1) - 1
                starts[shard] = self._window_starts(shard, epoch)
            start = int(starts[shard][offset])
            first, last = np.searchsorted(eos_at[shard], [start, start + self.seq_len], side="left")
            spans.append([int(first_document[shard] + first), int(first_document[shard] + last)])
        return spans

    def _batches(self, epoch: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
        """Batches from position ``(epoch, batch)`` on, each with the position after it."""
        cached: dict[int, np.ndarray] = {}  # shard index -> its windows' start tokens, shuffled
        streams: dict[int, np.ndarray] = {}
        while True:
            layout = self._epoch_layout(epoch)
            for batch_index in range(batch, self.batches_per_epoch):
                rows = []
                for shard, offset in self._rows(layout, batch_index):
                    if shard not in streams:
                        for old in list(streams):  # keep at most the two shards a batch can span
                            if len(streams) >= 2:
                                del streams[old], cached[old]
                        streams[shard], cached[shard] = self._load(shard, epoch)
                    start = int(cached[shard][offset])
                    rows.append(streams[shard][start:start + self.seq_len + 1])
                windows = torch.from_numpy(np.stack(rows))
                after = (epoch, batch_index + 1) if batch_index + 1 < self.batches_per_epoch else (epoch + 1, 0)
                yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), *after
            epoch, batch = epoch + 1, 0
            streams.clear()
            cached.clear()

    def _load(self, shard: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self.manifest["shards"][shard]
        data = read_shard(self.directory, entry, self.manifest["dtype"])
        stream = np.empty(len(data.tokens) + len(data.lengths), dtype=np.int64)
        eos_at = np.cumsum(data.lengths.astype(np.int64) + 1) - 1
        is_token = np.ones(len(stream), dtype=bool)
        is_token[eos_at] = False
        stream[is_token] = data.tokens
        stream[eos_at] = self.eos_id
        return stream, self._window_starts(shard, epoch)

    # --- serving ---------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(input_ids, labels)``; labels are the inputs shifted by one token."""
        if self.prefetch == 0:
            if self._thread is None:
                self._thread = self._batches(self.epoch, self.batch)  # type: ignore[assignment]
            item = next(self._thread)  # type: ignore[call-overload]
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._thread = None
                raise item
        input_ids, labels, self.epoch, self.batch = item
        return input_ids, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self.epoch, self.batch, self._stop, self._queue),
                                        name="TokenLoader-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, epoch: int, batch: int, stop: threading.Event, out: queue.Queue) -> None:
        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_SECONDS)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in self._batches(epoch, batch):
                if not put(item):
                    return
        except BaseException as error:  # handed to the consumer, raised by next_batch
            put(error)

    def close(self) -> None:
        """Stop the prefetch thread (it restarts on the next :meth:`next_batch`)."""
        thread, self._thread = self._thread, None
        if isinstance(thread, threading.Thread):
            self._stop.set()
            thread.join()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- resumable state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "seq_len": self.seq_len,
                "batch_sizes": list(self.batch_sizes), "world_size": self.world_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the settings and shards must match the saved ones.

        Raises:
            ValueError: a setting (the per-rank batch sizes too) or the shards differ (the
                batches would differ), or the position is out of range.
        """
        for key in ("seed", "seq_len", "world_size", "fingerprint"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}; resuming would serve different batches")
        check_saved_batch_sizes(state, self.batch_sizes)
        epoch, batch = state.get("epoch"), state.get("batch")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"loader state has epoch={epoch!r}; expected a non-negative int")
        if not isinstance(batch, int) or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"loader state has batch={batch!r}; expected an int in [0, {self.batches_per_epoch})")
        self.close()
        self.epoch, self.batch = epoch, batch
