"""Exceptions raised for bad data files and missing optional dependencies."""

from __future__ import annotations


class DataError(ValueError):
    """A data file (or directory) is missing, empty or malformed.

    The message names the file (as ``path:line`` where a line is at fault) and says what was
    expected, so a command-line front end can print it as one line and exit 2.
    """


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it
    (e.g. ``pip install ling-data[kg]``), so a command-line front end can print it as one
    line and exit 2."""
