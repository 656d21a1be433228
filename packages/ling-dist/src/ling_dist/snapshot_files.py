"""The on-disk layout of flash checkpoint snapshots: writing a file atomically, deciding which
snapshots are complete, loading one with its checksum verified. No collectives: every rank reads
the same files and so picks the same snapshot.

```
DIR/step-000000120/rank-00000.pt     torch.save of rank 0's state, renamed into place when whole
DIR/step-000000120/rank-00000.json   its manifest: step, rank, world_size, bytes, sha256; written last
```
A snapshot is complete when every rank's manifest exists and names a file of the recorded size,
so a worker killed mid-write (a torn temp file, no manifest) leaves the snapshot incomplete and
`latest_complete` skips it (the directory must be shared: one host, or a shared file system).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STEP_DIR_PATTERN = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A snapshot on disk is unusable: checksum mismatch, bad manifest, missing rank file."""


@dataclass(frozen=True)
class Snapshot:
    step: int
    path: Path
    world_size: int


def step_dir_of(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}"


def rank_file_stem(rank: int) -> str:
    return f"rank-{rank:05d}"


class HashingWriter:
    """A write-only file wrapper that hashes what passes through, so the checksum costs no re-read."""

    def __init__(self, file) -> None:
        self.file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_atomic(path: Path, write, before_rename=lambda: None) -> None:
    """`write(file)` into a temp file, fsync, rename onto `path`; `before_rename` may raise to abandon it."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        before_rename()
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_snapshots(directory: str | os.PathLike, world_size: int | None = None) -> list[Snapshot]:
    """Complete snapshots under `directory`, oldest first (see the module docstring); only those
    written by `world_size` ranks when given. A missing, unreadable or damaged manifest counts as
    missing, so a resume falls back to the next older snapshot instead of failing."""
    directory = Path(directory)
    found = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = STEP_DIR_PATTERN.match(entry.name)
        manifest = _read_manifest(entry / f"{rank_file_stem(0)}.json") if match else None
        size = manifest.get("world_size") if manifest else None
        if not isinstance(size, int) or (world_size is not None and size != world_size):
            continue
        if all(_rank_complete(entry, rank, size) for rank in range(size)):
            found.append(Snapshot(int(match.group(1)), entry, size))
    return sorted(found, key=lambda snapshot: snapshot.step)


def remove_step_dirs(directory: str | os.PathLike, doomed: Callable[[int], bool]) -> None:
    """Delete every `step-S` directory under `directory` (complete or not) whose step S is
    `doomed`; a missing directory, or one already gone, is fine."""
    directory = Path(directory)
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = STEP_DIR_PATTERN.match(entry.name)
        if match and doomed(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def latest_complete(directory: str | os.PathLike) -> Snapshot | None:
    """The newest complete snapshot, or None: the one every rank resumes from."""
    snapshots = list_snapshots(directory)
    return snapshots[-1] if snapshots else None


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or not JSON: that rank's part is not there
        return None
    return manifest if isinstance(manifest, dict) else None


def _rank_complete(step_dir: Path, rank: int, world_size: int) -> bool:
    """This rank's manifest names its own file, for this world size, and the file has the recorded size."""
    manifest = _read_manifest(step_dir / f"{rank_file_stem(rank)}.json")
    name = f"{rank_file_stem(rank)}.pt"
    if manifest is None or "sha256" not in manifest or (
            manifest.get("world_size"), manifest.get("rank"), manifest.get("file")) != (world_size, rank, name):
        return False
    try:  # rank 0's writer thread may be pruning this directory while it is listed
        return (step_dir / name).stat().st_size == manifest.get("bytes")
    except OSError:
        return False


def load_snapshot(snapshot: Snapshot, rank: int, map_location: Any = "cpu") -> dict:
    """This rank's state from `snapshot`, after checking its sha256 against the manifest."""
    if rank >= snapshot.world_size:
        raise CheckpointError(f"{snapshot.path}: written by {snapshot.world_size} ranks, no file for rank {rank} "
                              "(a different world size needs a resharding checkpoint, see ling_dist.migration)")
    manifest = _read_manifest(snapshot.path / f"{rank_file_stem(rank)}.json")
    if manifest is None:
        raise CheckpointError(f"{snapshot.path}: the manifest of rank {rank} is missing or damaged")
    data = (snapshot.path / manifest["file"]).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise CheckpointError(f"{snapshot.path / manifest['file']}: sha256 {digest[:12]}... but the manifest "
                              f"recorded {manifest['sha256'][:12]}...; the file was altered after it was written")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
