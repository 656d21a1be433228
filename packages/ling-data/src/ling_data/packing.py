"""Pack token lists into one stream and serve it as shuffled, rank-sharded batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ling_data.errors import DataError
from ling_data.rank_batches import check_saved_batch_sizes, global_batch_text, rank_batch_sizes


def pack_documents(token_lists: Iterable[Sequence[int]], eos_id: int) -> torch.Tensor:
    """Concatenate documents into one 1-D int64 stream, each document followed by ``eos_id``."""
    if not isinstance(eos_id, int) or eos_id < 0:
        raise ValueError(f"eos_id={eos_id!r}; expected a non-negative int")
    eos = np.array([eos_id], dtype=np.int64)
    parts = []
    for index, tokens in enumerate(token_lists):
        array = np.asarray(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(
                f"document {index}: expected a 1-D sequence of int token ids, "
                f"got {array.dtype} with shape {array.shape}"
            )
        parts.append(array.astype(np.int64, copy=False))
        parts.append(eos)
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(parts))


class PackedLoader:
    """Serve ``(input_ids, labels)`` batches of windows cut from a token stream.

    The stream is cut into ``n = (len(stream) - 1) // seq_len`` windows of ``seq_len + 1``
    tokens, window ``i`` starting at ``i * seq_len``; a window gives ``inputs = w[:-1]`` and
    ``labels = w[1:]``. Epoch ``e`` visits the windows in the order
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``, cut into
    consecutive global batches of ``batch_size * world_size`` windows, of which rank ``r`` of
    ``world_size`` takes the ``r``-th ``batch_size``, so ranks see disjoint windows. With
    ``batch_sizes`` (one per rank, e.g. ``[8, 2]`` for a GPU and a CPU rank) a global batch is
    ``sum(batch_sizes)`` windows and rank ``r`` takes ``batch_sizes[r]`` of them from
    ``sum(batch_sizes[:r])`` on (:mod:`ling_data.rank_batches`). Every rank takes the same
    number of batches per epoch (:attr:`batches_per_epoch`); the windows left over (fewer than a
    global batch) are skipped that epoch and land elsewhere in the next permutation.

    Iterating yields batches forever; :meth:`state_dict` / :meth:`load_state_dict` save and
    restore the position so a resumed loader yields exactly the batches an uninterrupted one
    would. Since ranks advance in lockstep, any rank's state restores every rank.
    """

    def __init__(
        self,
        stream: torch.Tensor | Sequence[int],
        seq_len: int,
        batch_size: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:
        for name, value in (("seq_len", seq_len), ("world_size", world_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r}; expected a positive int")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}; expected an int in [0, world_size={world_size})")
        self.batch_sizes = rank_batch_sizes(batch_size, batch_sizes, rank, world_size)
        stream = torch.as_tensor(stream, dtype=torch.int64)
        if stream.ndim != 1:
            raise ValueError(f"stream has shape {tuple(stream.shape)}; expected a 1-D token stream")
        self.seq_len = seq_len
        self.batch_size = self.batch_sizes[rank]  # this rank's rows per batch
        self.global_batch_size = sum(self.batch_sizes)
        self._first_row = sum(self.batch_sizes[:rank])  # this rank's offset in a global batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_windows = max(len(stream) - 1, 0) // seq_len
        self.batches_per_epoch = self.num_windows // self.global_batch_size
        if self.batches_per_epoch == 0:
            needed = self.global_batch_size
            raise DataError(
                f"token stream of {len(stream)} tokens is too short: it gives {self.num_windows} "
                f"windows of seq_len+1={seq_len + 1} tokens, but {global_batch_text(self.batch_sizes)} "
                f"needs at least {needed} windows "
                f"({needed * seq_len + 1} tokens); use more documents or a smaller seq_len/batch_size"
            )
        # unfold makes a view: window i is stream[i*seq_len : i*seq_len + seq_len + 1].
        self._stream = stream
        self._windows = stream.unfold(0, seq_len + 1, seq_len)
        self._document_ends: dict[int, torch.Tensor] = {}  # eos_id -> offsets of the EOS tokens
        self.epoch = 0
        self.position = 0  # batches this rank has taken in the current epoch
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.num_windows, generator=generator)
            self._order_epoch = self.epoch
        return self._order

    def window_indices(self, epoch: int, position: int) -> torch.Tensor:
        """The windows (rows) of this rank's batch at ``(epoch, position)``, in row order."""
        start = position * self.global_batch_size + self._first_row
        if epoch == self.epoch:
            return self._epoch_order()[start : start + self.batch_size]
        order = torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[start : start + self.batch_size]

    def batch_documents(self, epoch: int, position: int, eos_id: int) -> list[list[int]]:
        """For each row of this rank's batch at ``(epoch, position)``: ``[first, last]``, the
        documents (numbered from 0 in the order they were packed) its ``seq_len + 1`` tokens come
        from. Documents are told apart by the ``eos_id`` that ends each one in a stream written by
        :func:`pack_documents`; the EOS offsets are found once per ``eos_id`` (one pass over the
        stream), each lookup is then a binary search."""
        if eos_id not in self._document_ends:
            self._document_ends[eos_id] = (self._stream == eos_id).nonzero().flatten()
        ends = self._document_ends[eos_id]
        first = self.window_indices(epoch, position) * self.seq_len
        # the document of the token at offset t is the number of documents ended before t
        bounds = torch.searchsorted(ends, torch.stack([first, first + self.seq_len], dim=1))
        return bounds.tolist()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(input_ids, labels)``, each ``[batch_size, seq_len]`` int64 (this rank's size)."""
        windows = self._windows[self.window_indices(self.epoch, self.position)]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is (``epoch``, ``position``) and what it was built with."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_sizes": list(self.batch_sizes),
            "world_size": self.world_size,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the loader's settings must match the ones saved there.

        Raises:
            ValueError: a setting differs (the batches would differ), including the
                per-rank batch sizes, or the position is out of range.
        """
        for key in ("seed", "seq_len", "world_size", "num_windows"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {key}={getattr(self, key)!r}; "
                    "resuming would serve different batches"
                )
        check_saved_batch_sizes(state, self.batch_sizes)
        epoch, position = state["epoch"], state["position"]
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"loader state has epoch={epoch!r}; expected a non-negative int")
        if not isinstance(position, int) or not 0 <= position < self.batches_per_epoch:
            raise ValueError(
                f"loader state has position={position!r}; expected an int in [0, {self.batches_per_epoch})"
            )
        self.epoch = epoch
        self.position = position
