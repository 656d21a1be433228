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
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # re-injected (input_ids, labels) rows
        self.last_index = -1
        self.last_position: dict[str, int] = {}
        self.last_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            position = loader_position(self.inner)
            input_ids, labels = self.inner.next_batch()
            index = self.batches_drawn
            self.batches_drawn += 1
            if index not in self.skipped:
                break
        self.last_index, self.last_position = index, position
        self.last_batch = (input_ids, labels)
        for _ in range(min(self.rows_per_batch, len(self.pending))):
            ids_row, labels_row = self.pending.pop(0)
            at = int(torch.randint(input_ids.shape[0] + 1, (1,), generator=self.generator))
            input_ids = torch.cat([input_ids[:at], ids_row[None], input_ids[at:]])
            labels = torch.cat([labels[:at], labels_row[None], labels[at:]])
        return input_ids, labels

    def batch_info(self) -> dict[str, Any]:
        """The identity of the last batch drawn, for event rows (its own rows, not re-injected ones)."""
        return identify({"batch": self.last_index, **self.last_position}, self.describe)

    def reinject_last(self) -> int:
        """Queue the last batch's own sequences (not rows re-injected into it) for later batches."""
        input_ids, labels = self.last_batch
        self.pending.extend(zip(input_ids.unbind(0), labels.unbind(0)))
        return input_ids.shape[0]

    def skip(self, indices) -> None:
        self.skipped.update(indices)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "batches_drawn": self.batches_drawn,
                "skipped": sorted(self.skipped), "generator": self.generator.get_state(),
                "pending": [(a.clone(), b.clone()) for a, b in self.pending]}

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
        self.pending = [(a.clone(), b.clone()) for a, b in state["pending"]]


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
