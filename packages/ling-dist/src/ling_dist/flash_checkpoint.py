"""Flash checkpoint: the step blocks only for a copy of the state into host memory; a background
thread writes it to disk, atomically, and keeps the last N snapshots.

Layout (one directory per snapshot, one file per rank, no collectives anywhere):
```
DIR/step-000000120/rank-00000.pt     torch.save of rank 0's state, renamed into place when whole
DIR/step-000000120/rank-00000.json   its manifest: step, rank, world_size, bytes, sha256; written last
```
A snapshot is complete when every rank's manifest exists and names a file of the recorded size,
so a worker killed mid-write (a torn temp file, no manifest) leaves the snapshot incomplete and
`latest_complete` skips it. Every rank sees the same files, so every rank picks the same step
(the directory must be shared: one host, or a shared file system). Loading verifies the sha256.

Why a copy first: a training step that waits for `torch.save` (pickling + disk) stalls for the
whole write; copying tensors into preallocated host buffers is a memcpy (device-to-host DMA on
CUDA, into pinned memory), after which the optimizer may overwrite the live tensors at once.
The buffers are reused, so after the first snapshot there is no allocation on the step path.
There is one set of buffers: a snapshot requested while the previous one is still being
written waits for it (back-pressure).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A snapshot on disk is unusable: checksum mismatch, bad manifest, missing rank file."""


@dataclass(frozen=True)
class Snapshot:
    step: int
    path: Path
    world_size: int


def _step_dir(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}"


def _rank_name(rank: int) -> str:
    return f"rank-{rank:05d}"


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through, so the checksum costs no re-read."""

    def __init__(self, file) -> None:
        self.file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _write_atomic(path: Path, write) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """Complete snapshots under `directory`, oldest first (see the module docstring)."""
    directory = Path(directory)
    found = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = _STEP_DIR.match(entry.name)
        if not match:
            continue
        manifest = _read_manifest(entry / f"{_rank_name(0)}.json")
        if manifest is None:
            continue
        world_size = manifest["world_size"]
        if all(_rank_complete(entry, rank, world_size) for rank in range(world_size)):
            found.append(Snapshot(int(match.group(1)), entry, world_size))
    return sorted(found, key=lambda snapshot: snapshot.step)


def latest_complete(directory: str | os.PathLike) -> Snapshot | None:
    """The newest complete snapshot, or None: the one every rank resumes from."""
    snapshots = list_snapshots(directory)
    return snapshots[-1] if snapshots else None


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # never torn (renamed into place)
        raise CheckpointError(f"{path}: manifest is not valid JSON ({error})") from None


def _rank_complete(step_dir: Path, rank: int, world_size: int) -> bool:
    manifest = _read_manifest(step_dir / f"{_rank_name(rank)}.json")
    if manifest is None:
        return False
    if manifest.get("world_size") != world_size:
        raise CheckpointError(f"{step_dir}/{_rank_name(rank)}.json: world_size {manifest.get('world_size')} "
                              f"but rank 0 recorded {world_size}")
    data = step_dir / manifest["file"]
    return data.is_file() and data.stat().st_size == manifest["bytes"]


def load_snapshot(snapshot: Snapshot, rank: int, map_location: Any = "cpu") -> dict:
    """This rank's state from `snapshot`, after checking its sha256 against the manifest."""
    if rank >= snapshot.world_size:
        raise CheckpointError(f"{snapshot.path}: written by {snapshot.world_size} ranks, no file for rank {rank} "
                              "(a different world size needs a resharding checkpoint, see ling_dist.migration)")
    manifest = _read_manifest(snapshot.path / f"{_rank_name(rank)}.json")
    data = (snapshot.path / manifest["file"]).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise CheckpointError(f"{snapshot.path / manifest['file']}: sha256 {digest[:12]}... but the manifest "
                              f"recorded {manifest['sha256'][:12]}...; the file was altered after it was written")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


class FlashCheckpointer:
    """Snapshot `state` (a nested dict/list of tensors and picklable values) without waiting for disk.

    `save(step, state)` blocks for the host copy only (or, with `overlap=True`, not even that:
    see `save`), then returns; `wait()` blocks until every
    requested snapshot is on disk; `restore()` loads this rank's state from the newest complete
    snapshot (or returns None). `keep_last` complete snapshots are kept; rank 0 deletes older ones.
    Errors of the background writer are raised from the next `save`/`wait`.
    `last_blocking_s` is how long the last `save` held the caller (with `overlap=True`, add
    `last_fence_wait_s`, the guarded optimizer step's wait for the copy).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, overlap: bool = False,
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
        self._error: BaseException | None = None
        self.overlap = overlap
        self._copied = threading.Event()
        self._copied.set()

    # -- the step path ------------------------------------------------------------------------
    def save(self, step: int, state: Any) -> None:
        """Snapshot `state` as of now and write it in the background.

        Synchronous (default): returns once the tensors are copied to host memory. With
        `overlap=True` (constructor) the copy itself also runs on the writer thread and `save`
        returns after walking the state; the tensors must then not change until
        `wait_for_copy()`: `guard(optimizer)` makes every `optimizer.step()` wait for it, which
        covers parameters and optimizer state, so the copy hides behind the next forward and
        backward. (Buffers a forward pass updates in place, e.g. BatchNorm statistics, are not
        covered: use the synchronous mode for those.)
        """
        start = time.perf_counter()
        self.wait()
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        host_state = self._to_host(state, iter(range(1 << 62)), copies)
        self._copied.clear()
        if not self.overlap:
            self._copy(copies)
            copies = []
        self._thread = threading.Thread(target=self._persist_guarded, args=(step, host_state, copies),
                                        name=f"flash-checkpoint-{step}", daemon=True)
        self._thread.start()
        self.last_blocking_s = time.perf_counter() - start

    def wait_for_copy(self) -> None:
        """Block until the tensors of the last `save` are in host memory (at once when synchronous)."""
        self._copied.wait()

    def guard(self, optimizer: torch.optim.Optimizer):
        """Make `optimizer.step()` wait for the snapshot copy first (for `overlap=True`); returns
        the hook handle. `last_fence_wait_s` is how long the last such wait held the step."""
        def fence(*args) -> None:
            start = time.perf_counter()
            self.wait_for_copy()
            self.last_fence_wait_s = time.perf_counter() - start
        return optimizer.register_step_pre_hook(fence)

    def _copy(self, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        try:
            for buffer, tensor in copies:
                buffer.copy_(tensor, non_blocking=buffer.is_pinned())
            if any(buffer.is_pinned() for buffer, _ in copies):
                torch.cuda.current_stream().synchronize()  # the non_blocking device-to-host copies
        finally:
            self._copied.set()

    def _to_host(self, value: Any, counter, copies: list) -> Any:
        if isinstance(value, torch.Tensor):
            return self._host_buffer(value, next(counter), copies)
        if isinstance(value, dict):
            return {key: self._to_host(item, counter, copies) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._to_host(item, counter, copies) for item in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuple
        return copy.deepcopy(value)  # loader positions, RNG states, counters: frozen as of now

    def _host_buffer(self, tensor: torch.Tensor, key: int, copies: list) -> torch.Tensor:
        tensor = tensor.detach()
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
        """Block until the snapshot being written (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"{self.directory}: writing a snapshot failed: {error}") from error

    def close(self) -> None:
        self.wait()

    # -- the background writer ----------------------------------------------------------------
    def _persist_guarded(self, step: int, host_state: Any, copies: list) -> None:
        try:
            self._copy(copies)
            self._persist(step, host_state)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread by wait()
            self._error = error

    def _persist(self, step: int, host_state: Any) -> None:
        step_dir = _step_dir(self.directory, step)
        step_dir.mkdir(parents=True, exist_ok=True)
        name = _rank_name(self.rank)
        hashed: list[_HashingWriter] = []

        def write_data(file) -> None:
            writer = _HashingWriter(file)
            torch.save(host_state, writer)
            hashed.append(writer)
        _write_atomic(step_dir / f"{name}.pt", write_data)
        manifest = {"step": step, "rank": self.rank, "world_size": self.world_size, "file": f"{name}.pt",
                    "bytes": hashed[0].bytes, "sha256": hashed[0].sha256.hexdigest()}
        _write_atomic(step_dir / f"{name}.json", lambda file: file.write(json.dumps(manifest).encode()))
        _fsync_dir(step_dir)
        logger.info("rank %d: snapshot step %d written to %s", self.rank, step, step_dir)
        if self.rank == 0:
            self._prune()

    def _prune(self) -> None:
        """Delete every step directory older than the `keep_last` newest complete snapshots
        (incomplete ones included: they are torn or abandoned once something newer is complete)."""
        complete = list_snapshots(self.directory)
        if len(complete) <= self.keep_last:
            return
        oldest_kept = complete[-self.keep_last].step
        for entry in self.directory.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and int(match.group(1)) < oldest_kept:
                shutil.rmtree(entry, ignore_errors=True)

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
        return snapshot.step, (state if like is None else _as_like(state, like, snapshot.path))


def _as_like(value: Any, like: Any, where: Path) -> Any:
    """`value` with every tensor that is a DTensor in `like` rebuilt from its local shard."""
    from torch.distributed.tensor import DTensor

    if isinstance(like, DTensor):
        if not isinstance(value, torch.Tensor) or value.shape != like.to_local().shape:
            raise CheckpointError(f"{where}: a shard of shape {getattr(value, 'shape', None)} where the live "
                                  f"state has {tuple(like.to_local().shape)}; was it written with another mesh?")
        local = value.to(like.to_local().device)
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    if isinstance(value, dict) and isinstance(like, dict):
        return {key: _as_like(item, like[key], where) if key in like else item for key, item in value.items()}
    if isinstance(value, (list, tuple)) and isinstance(like, (list, tuple)) and len(value) == len(like):
        items = [_as_like(item, template, where) for item, template in zip(value, like)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value
