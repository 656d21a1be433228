"""How the loaders cut an epoch's global batch among ranks, with per-rank sizes.

A global batch is ``sum(batch_sizes)`` consecutive windows of the epoch's order; rank ``r`` takes
the ``batch_sizes[r]`` windows starting at ``sum(batch_sizes[:r])``. Unequal sizes let a fast
device take more rows per step than a slow one (heterogeneous Local SGD, whose average weights
each rank by its tokens) while every rank still takes the same number of batches per epoch, so
the ranks' positions stay in lockstep and any rank's state restores all of them. Equal sizes are
the plain ``batch_size x world_size`` layout, batch for batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def rank_batch_sizes(batch_size: int | None, batch_sizes: Sequence[int] | None, rank: int,
                     world_size: int) -> tuple[int, ...]:
    """Every rank's rows per batch: ``batch_sizes`` (one per rank) or ``batch_size`` for all.

    Raises:
        ValueError: neither is given, a size is not a positive int, ``batch_sizes`` does not
            have ``world_size`` entries, or ``batch_size`` disagrees with ``batch_sizes[rank]``.
    """
    if batch_sizes is None:
        if batch_size is None:
            raise ValueError("batch_size=None; give batch_size (every rank) or batch_sizes (one per rank)")
        if not _positive_int(batch_size):
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
        return (batch_size,) * world_size
    sizes = tuple(batch_sizes)
    if len(sizes) != world_size or not all(_positive_int(size) for size in sizes):
        raise ValueError(f"batch_sizes={list(sizes)!r}; expected {world_size} positive ints, one per rank "
                         f"(world_size={world_size})")
    if batch_size is not None and batch_size != sizes[rank]:
        raise ValueError(f"batch_size={batch_size!r} but batch_sizes[{rank}]={sizes[rank]} for rank {rank}; "
                         "give batch_sizes alone or make them agree")
    return sizes


def global_batch_text(batch_sizes: Sequence[int]) -> str:
    """The global batch as an error message shows it."""
    if len(set(batch_sizes)) == 1:
        return f"batch_size={batch_sizes[0]} x world_size={len(batch_sizes)}"
    return f"batch_sizes={list(batch_sizes)} (sum {sum(batch_sizes)})"


def saved_batch_sizes(state: Mapping[str, Any]) -> list[int] | None:
    """The per-rank sizes a loader state was saved with (None: not recorded). States written
    before per-rank sizes hold one ``batch_size`` for every rank."""
    if "batch_sizes" in state:
        return list(state["batch_sizes"])
    if "batch_size" in state and "world_size" in state:
        return [state["batch_size"]] * state["world_size"]
    return None


def check_saved_batch_sizes(state: Mapping[str, Any], batch_sizes: Sequence[int]) -> None:
    """Refuse a loader state saved with other per-rank sizes: its position counts other batches.

    Raises:
        ValueError: naming both lists.
    """
    saved = saved_batch_sizes(state)
    if saved is not None and saved != list(batch_sizes):
        raise ValueError(f"loader state has batch_sizes={saved} but this loader has batch_sizes={list(batch_sizes)}; "
                         "resuming would serve different batches")
