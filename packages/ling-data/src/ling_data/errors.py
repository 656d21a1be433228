"""Exceptions raised for bad data files and missing optional dependencies."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A data file (or directory) is missing, empty or malformed.

    The message names the file (as ``path:line`` where a line is at fault) and says what was
    expected, so a command-line front end can print it as one line and exit 2.
    """


def refuse_to_replace(path: "str | os.PathLike[str]", overwrite: bool) -> None:
    """Raise :class:`DataError` when ``path`` already holds output (a file, or a non-empty
    directory) and ``overwrite`` is off: a command never silently replaces earlier work."""
    from pathlib import Path

    path = Path(path)
    if overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    kind = "a non-empty directory" if path.is_dir() else "a file"
    raise DataError(f"--out {path}: already exists ({kind}); pass --overwrite to replace it, "
                    "or choose a new --out")


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it
    (e.g. ``pip install ling-data[kg]``), so a command-line front end can print it as one
    line and exit 2."""
