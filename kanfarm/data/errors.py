"""Errors of the data package: a dataset whose files are missing, and a file that is not in its format."""
from __future__ import annotations


class DatasetUnavailable(RuntimeError):
    """Raw files are missing and could not be downloaded; the message says which, where, and from where."""


class DatasetFormatError(ValueError):
    """A raw file exists but does not hold what its format promises (bad magic, sizes, labels)."""
