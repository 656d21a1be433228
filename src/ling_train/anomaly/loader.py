"""A loader wrapper that names every batch and can re-inject or skip batches.

- Each batch drawn from the wrapped loader gets an index (0, 1, ...) and, when the loader has
  them, its `epoch`/`position`; anomaly events report these so the data can be found again, and
  `describe(position)` adds what the loader can tell about that batch (the document ids of each
  row, `ling_data.PackedLoader.batch_documents`), computed only for batches an event names.
- `reinject(index)`: the sequences of a skipped batch come back later, `rows_per_batch` at a time,
  each inserted at a random row of a later batch (the Ling report's loss-spike handling: the
  update is dropped, the data is not).
- `skip(indices)`: batches never to be trained on (rollback replays the data after its snapshot
  and passes over the offending batches).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class AnomalyLoader:
    def __init__(self, inner: Any, seed: int = 0, rows_per_batch: int = 1,
                 describe: Callable[[dict[str, int]], dict[str, Any]] | None = None):
        self.inner = inner
        self.describe = describe
        self.rows_per_batch = rows_per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self.skipped: set[int] = set()
        # re-injected rows: one tensor per part of a batch ((input_ids, labels), plus segment_ids for SFT)
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.last_index = -1
        self.last_position: dict[str, int] = {}
        self.last_batch: tuple[torch.Tensor, ...] | None = None

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The inner loader's next batch not skipped, with up to `rows_per_batch` re-injected rows;
        a batch is a tuple of [rows, ...] tensors, row i of each part belonging together."""
        while True:
            position = loader_position(self.inner)
            batch = tuple(self.inner.next_batch())
            index = self.batches_drawn
            self.batches_drawn += 1
            if index not in self.skipped:
                break
        self.last_index, self.last_position = index, position
        self.last_batch = batch
        for _ in range(min(self.rows_per_batch, len(self.pending))):
            rows = self.pending.pop(0)
            at = int(torch.randint(batch[0].shape[0] + 1, (1,), generator=self.generator))
            batch = tuple(torch.cat([part[:at], row[None], part[at:]]) for part, row in zip(batch, rows))
        return batch

    def batch_info(self) -> dict[str, Any]:
        """The identity of the last batch drawn, for event rows (its own rows, not re-injected ones)."""
        return identify({"batch": self.last_index, **self.last_position}, self.describe)

    def reinject_last(self) -> int:
        """Queue the last batch's own sequences (not rows re-injected into it) for later batches."""
        self.pending.extend(zip(*(part.unbind(0) for part in self.last_batch)))
        return self.last_batch[0].shape[0]

    def skip(self, indices) -> None:
        self.skipped.update(indices)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "batches_drawn": self.batches_drawn,
                "skipped": sorted(self.skipped), "generator": self.generator.get_state(),
                "pending": [tuple(part.clone() for part in rows) for rows in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the skip set is merged, never shrunk, so a rollback to an earlier
        state keeps passing over the batches it decided to skip."""
        if "batches_drawn" not in state:  # a checkpoint written without anomaly handling
            self.inner.load_state_dict(state)
            return
        self.inner.load_state_dict(state["inner"])
        self.batches_drawn = state["batches_drawn"]
        self.skipped.update(state["skipped"])
        self.generator.set_state(state["generator"])
        self.pending = [tuple(part.clone() for part in rows) for rows in state["pending"]]


def identify(position: dict[str, Any], describe: Callable[[dict[str, int]], dict[str, Any]] | None) -> dict[str, Any]:
    """`position` plus what `describe` adds (nothing when there is no describer or no position)."""
    if describe is None or not {"epoch", "position"} <= position.keys():
        return position
    return {**position, **describe(position)}


def loader_position(loader: Any) -> dict[str, int]:
    """Where `loader` is in its order, i.e. the place of the batch it serves next: {"epoch",
    "position"} (PackedLoader's names; TokenLoader calls the position in the epoch `batch`)."""
    if not hasattr(loader, "epoch"):
        return {}
    position = loader.position if hasattr(loader, "position") else getattr(loader, "batch", None)
    return {"epoch": loader.epoch, **({"position": position} if isinstance(position, int) else {})}
