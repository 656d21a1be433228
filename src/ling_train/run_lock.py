"""One process writes a run directory at a time: an exclusive `flock` on RUN/.lock.

Two runs sharing an `--out` (or a `--resume` of a run that is still writing) would interleave
metrics.jsonl and overwrite each other's checkpoints. The lock is held by the main rank for the
whole run and released by the OS when that process ends, however it ends, so a SIGKILLed run
never blocks its own resume and torchrun's restarted rank 0 retakes it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ling_train.config import RunConfigError

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run directory (resolved) -> the open lock file's descriptor


def lock_run_dir(out: Path) -> None:
    """Take RUN/.lock without waiting (idempotent in this process); RunConfigError if another
    process holds it, naming that process as it wrote itself into the file."""
    key = Path(out).resolve()
    if key in _held:
        return
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunConfigError(f"--out: {out} is in use by a run still writing it ({holder}); wait for it to "
                             f"end or choose another --out (nothing was written)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
    _held[key] = fd


def release_run_dir(out: Path) -> None:
    fd = _held.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock
