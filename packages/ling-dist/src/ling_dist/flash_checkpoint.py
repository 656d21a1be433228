"""Flash checkpoint: the step blocks only for a copy of the state into host memory; a background
thread writes it to disk, atomically, and keeps the last N snapshots.

Layout and completeness rules: `ling_dist.snapshot_files` (one directory per step, one file and
one manifest per rank, written last; no collectives anywhere). Loading verifies the sha256.

Why a copy first: a training step that waits for `torch.save` (pickling + disk) stalls for the
whole write; copying tensors into preallocated host buffers is a memcpy (device-to-host DMA on
CUDA, into pinned memory). The buffers are reused, so after the first snapshot there is no
allocation on the step path. There is one set of buffers: a snapshot requested while the
previous one is still being written waits for it (back-pressure).

Why overlapped when it can be: on a CPU a memcpy is only 2-3x faster than `torch.save` to the
page cache, so even the copy is far from free. Overlapped, the copy runs on the writer thread
while the next forward and backward run (they read the parameters, never write them), and the
first thing that writes them, the optimizer step, waits for the copy in a pre-step hook. The
commit (rename of the data file, then the manifest) happens only after that fence has checked,
with autograd version counters, that no tensor of the state changed in place before the copy
read it, so a missed fence yields an error and no snapshot rather than a torn one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ling_dist.snapshot_files import (CheckpointError, HashingWriter, Snapshot, fsync_dir, latest_complete,
                                     list_snapshots, load_snapshot, rank_file_stem, remove_step_dirs, step_dir_of,
                                     write_atomic)

__all__ = ["CheckpointError", "FlashCheckpointer", "Snapshot", "latest_complete", "list_snapshots", "load_snapshot",
           "shards_like"]

logger = logging.getLogger(__name__)

# at::internal::GRAIN_SIZE: torch runs an elementwise op on fewer elements than this on the
# calling thread, without starting an OpenMP parallel region.
_SINGLE_THREAD_ELEMENTS = 32768


def copy_on_this_thread(buffer: torch.Tensor, tensor: torch.Tensor) -> None:
    """`buffer.copy_(tensor)`, on the calling thread only when both are contiguous CPU tensors.

    Why: a plain `copy_` of a large CPU tensor is an OpenMP parallel region over every intra-op
    thread. Hundreds of them in a row (one per tensor of a model and its optimizer) are at the
    mercy of the slowest thread's scheduling: on a loaded 2-core machine 179 MiB in 712 tensors
    took 0.5-6.8 s this way against 0.07-0.15 s in chunks below the grain size (interleaved). And
    when overlapped, a copy on the writer thread must not take the training step's cores.
    Bitwise the same result as `copy_`.
    """
    if (tensor.device.type != "cpu" or buffer.device != tensor.device or buffer.dtype != tensor.dtype
            or not (tensor.is_contiguous() and buffer.is_contiguous())
            or tensor.numel() < _SINGLE_THREAD_ELEMENTS):
        buffer.copy_(tensor, non_blocking=buffer.is_pinned())
        return
    for destination, source in zip(buffer.view(-1).split(_SINGLE_THREAD_ELEMENTS),
                                   tensor.view(-1).split(_SINGLE_THREAD_ELEMENTS)):
        destination.copy_(source)


@dataclass
class _Pending:
    """One snapshot between `save()` and its commit (the rename of its data file and manifest)."""

    step: int
    host_state: Any
    copies: list  # (host buffer, live tensor) pairs; copied on the writer thread when overlapped
    watched: list  # (where in the state, live tensor, its version counter at save())
    copied: threading.Event = field(default_factory=threading.Event)
    checked: threading.Event = field(default_factory=threading.Event)  # by wait_for_snapshot()
    modified: list[str] = field(default_factory=list)  # tensors changed in place before the check


class FlashCheckpointer:
    """Snapshot `state` (a nested dict/list of tensors and picklable values) without waiting for disk.

    `save(step, state)` returns after copying the tensors to host memory (synchronous), or, when
    overlapped, right after walking the state: the copy then runs on the writer thread behind the
    next forward and backward. `wait()` blocks until every requested snapshot is on disk;
    `restore()` loads this rank's state from the newest complete snapshot (or returns None).
    `keep_last` complete snapshots are kept; rank 0 deletes older ones. Errors of the background
    writer are raised from the next `save`/`wait`.

    Overlapped is the default when `optimizers` are given: their `step()` is then fenced by
    construction (a pre-step hook calls `wait_for_snapshot()`), so they cannot change a tensor
    the copy has not read yet. Anything else that changes the state in place (a Local-SGD outer
    step outside those optimizers, a manual update, BatchNorm statistics in a forward) must call
    `wait_for_snapshot()` first. A violation is detected, not persisted: `wait_for_snapshot()`
    compares every tensor's autograd version counter with its value at `save()`, and a snapshot
    whose tensors changed in between is discarded (a `CheckpointError` from the next
    `save`/`wait`). Writes through `.data` or another alias bypass version counters and are not
    detected. Without `optimizers` the default is synchronous (nothing to fence).

    `last_blocking_s` is how long the last `save` held the caller; when overlapped add
    `last_fence_wait_s`, the last `wait_for_snapshot()`'s wait for the copy and the check.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2,
                 optimizers: Iterable[torch.optim.Optimizer] = (), overlap: bool | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: expected >= 1")
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.last_blocking_s = 0.0
        self.last_fence_wait_s = 0.0
        self._buffers: dict[int, torch.Tensor] = {}  # keyed by position in the flattened state
        self._thread: threading.Thread | None = None
        self._pending: _Pending | None = None
        self._error: BaseException | None = None
        optimizers = list(optimizers)
        self.overlap = bool(optimizers) if overlap is None else overlap
        self._hooks = [self.guard(optimizer) for optimizer in optimizers]

    # -- the step path ------------------------------------------------------------------------
    def save(self, step: int, state: Any) -> None:
        """Snapshot `state` as of now and write it in the background.

        Synchronous: returns once the tensors are copied to host memory. Overlapped: returns
        after walking the state (non-tensor values are deep-copied now); the tensors must not
        change in place until `wait_for_snapshot()`, which the guarded optimizers call for you.
        """
        start = time.perf_counter()
        self.wait()
        self.last_fence_wait_s = 0.0
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        watched: list[tuple[str, torch.Tensor, int]] | None = [] if self.overlap else None  # synchronous: no check
        host_state = self._to_host(state, "state", iter(range(1 << 62)), copies, watched)
        pending = _Pending(step, host_state, copies, watched or [])
        if not self.overlap:
            self._copy(pending)
            pending.checked.set()  # nothing ran between the copy and now
        self._pending = pending
        self._thread = threading.Thread(target=self._persist_guarded, args=(pending,),
                                        name=f"flash-checkpoint-{step}", daemon=True)
        self._thread.start()
        self.last_blocking_s = time.perf_counter() - start

    def wait_for_snapshot(self) -> None:
        """Block until the last `save`'s tensors are in host memory, then check that none of them
        changed in place since `save` (see the class docstring). Call before mutating the state;
        cheap when there is nothing to wait for."""
        pending = self._pending
        if pending is None or pending.checked.is_set():
            return
        start = time.perf_counter()
        pending.copied.wait()
        pending.modified = [where for where, tensor, version in pending.watched if tensor._version != version]
        pending.watched = []  # no references to live tensors beyond this point
        pending.checked.set()
        self.last_fence_wait_s = time.perf_counter() - start

    def guard(self, optimizer: torch.optim.Optimizer):
        """Make `optimizer.step()` call `wait_for_snapshot()` first; returns the hook handle
        (the constructor's `optimizers` are guarded already)."""
        return optimizer.register_step_pre_hook(lambda *args: self.wait_for_snapshot())

    def _copy(self, pending: _Pending) -> None:
        try:
            for buffer, tensor in pending.copies:
                copy_on_this_thread(buffer, tensor)
            # The non_blocking device-to-host copies, on each source device's current stream (this
            # thread's current device is cuda:0 whatever the rank's is, so name each device).
            for device in {tensor.device for buffer, tensor in pending.copies if buffer.is_pinned()}:
                torch.cuda.current_stream(device).synchronize()
        finally:
            pending.copies = []
            pending.copied.set()

    def _to_host(self, value: Any, where: str, counter, copies: list, watched: list | None) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()  # shares the version counter (a DTensor's too)
            if watched is not None:
                watched.append((where, tensor, tensor._version))
            return self._host_buffer(tensor, next(counter), copies)
        if isinstance(value, dict):
            return {key: self._to_host(item, f"{where}[{key!r}]", counter, copies, watched)
                    for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._to_host(item, f"{where}[{index}]", counter, copies, watched)
                     for index, item in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuple
        return copy.deepcopy(value)  # loader positions, RNG states, counters: frozen as of now

    def _host_buffer(self, tensor: torch.Tensor, key: int, copies: list) -> torch.Tensor:
        if hasattr(tensor, "full_tensor") and hasattr(tensor, "to_local"):  # DTensor: this rank's shard
            tensor = tensor.to_local()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.device.type == "cuda"
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buffer
        copies.append((buffer, tensor))
        return buffer

    def wait(self) -> None:
        """Block until the snapshot being written (if any) is on disk; raise its error if it failed.
        Checks the snapshot first (`wait_for_snapshot`) when that has not happened yet."""
        self.wait_for_snapshot()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"{self.directory}: writing a snapshot failed: {error}") from error

    def close(self) -> None:
        self.wait()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- the background writer ----------------------------------------------------------------
    def _persist_guarded(self, pending: _Pending) -> None:
        try:
            self._copy(pending)
            self._persist(pending)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread by wait()
            self._error = error

    def _commit_check(self, pending: _Pending) -> None:
        """Runs before the data file is renamed into place: waits for `wait_for_snapshot()`'s check."""
        pending.checked.wait()
        if pending.modified:
            shown = ", ".join(pending.modified[:3]) + (f" and {len(pending.modified) - 3} more"
                                                       if len(pending.modified) > 3 else "")
            raise CheckpointError(f"snapshot of step {pending.step} discarded: {shown} changed in place between "
                                  "save() and wait_for_snapshot(); call wait_for_snapshot() (or pass the "
                                  "optimizer as optimizers=[...]) before updating the state")

    def _persist(self, pending: _Pending) -> None:
        step_dir = step_dir_of(self.directory, pending.step)
        step_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.directory)  # the step directory's name, before a manifest in it can count
        name = rank_file_stem(self.rank)
        hashed: list[HashingWriter] = []

        def write_data(file) -> None:
            writer = HashingWriter(file)
            torch.save(pending.host_state, writer)
            hashed.append(writer)
        write_atomic(step_dir / f"{name}.pt", write_data, before_rename=lambda: self._commit_check(pending))
        fsync_dir(step_dir)  # the data file's name is durable before the manifest that vouches for it
        manifest = {"step": pending.step, "rank": self.rank, "world_size": self.world_size, "file": f"{name}.pt",
                    "bytes": hashed[0].bytes, "sha256": hashed[0].sha256.hexdigest()}
        write_atomic(step_dir / f"{name}.json", lambda file: file.write(json.dumps(manifest).encode()))
        fsync_dir(step_dir)
        logger.info("rank %d: snapshot step %d written to %s", self.rank, pending.step, step_dir)
        if self.rank == 0:
            self._prune()

    def _prune(self) -> None:
        """Delete every step directory older than the `keep_last` newest complete snapshots
        (incomplete ones included: they are torn or abandoned once something newer is complete)."""
        complete = list_snapshots(self.directory)
        if len(complete) <= self.keep_last:
            return
        oldest_kept = complete[-self.keep_last].step
        remove_step_dirs(self.directory, lambda step: step < oldest_kept)

    # -- resuming ------------------------------------------------------------------------------
    def restore(self, map_location: Any = "cpu", *, like: Any = None) -> tuple[int, Any] | None:
        """`(step, state)` of this rank from the newest complete snapshot, or None if there is none.

        Sharded tensors (FSDP2 DTensors) are snapshotted as this rank's local shard. Pass the live
        state as `like` (same structure, e.g. `get_state_dict(model, optimizer)` from
        torch.distributed.checkpoint.state_dict, which also creates the optimizer's state) and
        each shard comes back as a DTensor on `like`'s mesh and placements, on its device; the
        world size and mesh must be the ones that wrote it (another size: ling_dist.migration).
        """
        snapshot = latest_complete(self.directory)
        if snapshot is None:
            return None
        if snapshot.world_size != self.world_size:
            raise CheckpointError(f"{snapshot.path}: written by {snapshot.world_size} ranks, this job has "
                                  f"{self.world_size}; reshard with ling_dist.migration instead")
        state = load_snapshot(snapshot, self.rank, map_location)
        return snapshot.step, (state if like is None else shards_like(state, like, snapshot.path))


def shards_like(value: Any, like: Any, where: str | os.PathLike) -> Any:
    """`value` with every tensor that is a DTensor in `like` rebuilt from its local shard (a
    snapshot holds each rank's local shards as plain tensors); `where` names the source in errors."""
    from torch.distributed.tensor import DTensor

    if isinstance(like, DTensor):
        if not isinstance(value, torch.Tensor) or value.shape != like.to_local().shape:
            raise CheckpointError(f"{where}: a shard of shape {getattr(value, 'shape', None)} where the live "
                                  f"state has {tuple(like.to_local().shape)}; was it written with another mesh?")
        local = value.to(like.to_local().device)
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    if isinstance(value, dict) and isinstance(like, dict):
        return {key: shards_like(item, like[key], where) if key in like else item for key, item in value.items()}
    if isinstance(value, (list, tuple)) and isinstance(like, (list, tuple)) and len(value) == len(like):
        items = [shards_like(item, template, where) for item, template in zip(value, like)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value
