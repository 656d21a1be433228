"""Cluster migration: a checkpoint written by N ranks resumes on M ranks (or one process),
resharded, with any extra state (a Local-SGD anchor, outer momentum, counters) carried along.

Built on torch.distributed.checkpoint (DCP): each rank writes only its shards plus a global
metadata file that records every tensor's global shape and which byte ranges hold which slice,
so a loader with a different mesh reads exactly the slices its own shards need. The flash
snapshots (`FlashCheckpointer`) are per-rank and fast; this format is the one to write before
moving a job to another cluster size or device type (tensors are stored on the CPU side, so a
CPU job's checkpoint loads on CUDA and back).

`get_state_dict` / `set_state_dict` give model and optimizer state under fully-qualified
parameter names whatever the wrapping (plain, DDP, FSDP2), which is what makes the optimizer
state reshardable. Extra state: tensors (plain tensors must be identical on every rank; they are
written once) or DTensors (sharded like the model), and picklable values, identical on every
rank (DCP keeps one copy per key). Per-rank values (e.g. each rank's loader position) are not
meaningful at another world size: re-derive them, or key them by rank yourself.
Writes are atomic: all ranks write into `DIR.partial`, then rank 0 renames it to `DIR`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save_reshardable(directory: str | os.PathLike, model: nn.Module, optimizer: Optimizer | None = None,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write model (+ optimizer, + `extra`) so that any world size can load it. Collective: every rank calls it."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    rank0 = not _distributed() or dist.get_rank() == 0
    if rank0 and partial.exists():
        shutil.rmtree(partial)  # left by a job that died mid-write
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_state, "extra": extra if extra is not None else {}}
    if optimizer is not None:
        state["optimizer"] = optimizer_state
    dcp.save(state, checkpoint_id=partial)
    _barrier()
    if rank0:
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(partial, directory)
    _barrier()
    return directory


def load_resharded(directory: str | os.PathLike, model: nn.Module, optimizer: Optimizer | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load into `model` / `optimizer` as sharded *now* (after `apply_fsdp` etc. at the new size).

    `extra` is a template: its tensors (of the right global shapes) are filled in place and its
    other values replaced; the filled dict is returned. Collective: every rank calls it.
    """
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory}: not a complete reshardable checkpoint (no .metadata)")
    model_state, optimizer_state = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_state, "extra": extra if extra is not None else {}}
    if optimizer is not None:
        state["optimizer"] = optimizer_state
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))
    return state["extra"]


def local_sgd_state_for_world_size(state: dict[str, Any], new_world_size: int) -> dict[str, Any]:
    """One rank's `LocalSGD.state_dict()` made loadable at `new_world_size` workers.

    The anchor, the outer optimizer (momentum), the sync counters and the agreed
    `global_inner_steps` are the same on every rank and carry over unchanged. What a rank keeps
    for *each* worker (the EDiT/A-EDiT norm penalty's per-worker trackers) is indexed by worker:
    new worker r takes old worker r mod (old count)'s entry, the same rule a trainer uses to pick
    which old rank's per-rank state (inner optimizer, weights between syncs) new rank r loads.
    Returns a shallow copy; `state` is not modified.
    """
    if new_world_size < 1:
        raise ValueError(f"new_world_size={new_world_size}: expected >= 1")
    state = dict(state)
    trackers = (state.get("weighting") or {}).get("trackers")
    if trackers:
        state["weighting"] = {**state["weighting"],
                              "trackers": [trackers[r % len(trackers)] for r in range(new_world_size)]}
    return state
