"""Exception raised for bad data files."""

from __future__ import annotations


class DataError(ValueError):
    """A data file (or directory) is missing, empty or malformed.

    The message names the file (as ``path:line`` where a line is at fault) and says what was
    expected, so a command-line front end can print it as one line and exit 2.
    """
