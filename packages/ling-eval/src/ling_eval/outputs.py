"""Output directories checked before the long work, so a bad `--out` costs seconds, not a run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def output_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a directory we write into, or None if it can.

    The probe creates and removes a directory where the output would go (the nearest existing
    ancestor while `path` does not exist yet): permission bits, a read-only mount or a full inode
    table all show up here, and nothing is left behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory, so {path} cannot be created"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=parent))
    except OSError as e:
        return f"cannot write to {parent}: {e.strerror or e} (errno {e.errno})"
    return None
