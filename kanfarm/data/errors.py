"""Errors of the data package: a dataset whose files are missing, a file that is not in its format,
and an option its loader does not accept."""
from __future__ import annotations


class DatasetUnavailable(RuntimeError):
    """Raw files are missing and could not be downloaded; the message says which, where, and from where."""


class DatasetFormatError(ValueError):
    """A raw file exists but does not hold what its format promises (bad magic, sizes, labels)."""


class OptionError(ValueError):
    """A dataset option the loader does not accept; ``option`` names it."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option
