"""Crash-safe checkpoints: atomic writes, a sha256 per file, the last N kept, a fallback chain on load.

A checkpoint is written to a temporary file, fsynced and renamed into place, then its sha256 is
written beside it the same way: a checkpoint without a matching digest is never trusted. Loading
uses ``torch.load(weights_only=True)`` so a tampered file cannot run code.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from kanfarm.atomic import atomic_write, remove_leftovers

log = logging.getLogger(__name__)

_NAME = re.compile(r"^epoch-(\d{6})\.pt$")
#: ``atomic_write``'s temporary names for a checkpoint and its digest
_TEMPORARY = re.compile(r"^\.epoch-\d{6}\.pt(\.sha256)?\.[A-Za-z0-9_]+\.tmp$")


class CheckpointManager:
    """Saves and restores one run's training state in ``directory``.

    ``every``: save after every N-th epoch (the final epoch is always saved); ``min_interval_s``:
    additionally skip saves closer together than this (0 = no time limit); ``on_save`` is told
    (epoch, path, sha256) after each save, before older checkpoints are removed, and of the
    checkpoint a resume starts from, e.g. to record it in the store; when it returns False (the
    record was refused: the run is another worker's now) the save removes nothing. ``allowed``,
    when given, is asked before each save, and a save it refuses writes nothing (a worker that
    lost its run must not write into the directory of the worker that took it over);
    ``usable``, when given, is asked for each checkpoint's (epoch, sha256) on load, and one it
    refuses is skipped: the store holds the digest of each checkpoint it recorded and the rows up
    to its epoch, and a file it did not record (a new database beside an old checkpoint folder,
    or a write by a worker that lost the run between ``allowed`` and its record) is not resumed.
    """

    def __init__(self, directory: str | os.PathLike, config_hash: str, keep: int = 2, every: int = 1,
                 min_interval_s: float = 0.0,
                 on_save: Callable[[int, Path, str], bool | None] | None = None,
                 allowed: Callable[[], bool] | None = None,
                 usable: Callable[[int, str], bool] | None = None):
        if keep < 1 or every < 1:
            raise ValueError("keep and every must be at least 1")
        self.directory = Path(directory)
        self.config_hash = config_hash
        self.keep = keep
        self.every = every
        self.min_interval_s = min_interval_s
        self.on_save = on_save
        self.allowed = allowed
        self.usable = usable
        self._last_save = 0.0
        #: the epoch of the checkpoint this manager last wrote or resumed from: a stop needs no
        #: other (a file of that epoch it did not write may be one the store never recorded)
        self.saved_epoch: int | None = None

    def check_owner(self, config_hash: str) -> None:
        """Refuse to train a config with another config's checkpoints: a resume would carry on
        that run's weights and optimiser under this run's name."""
        if config_hash != self.config_hash:
            raise ValueError(f"checkpoints for config {self.config_hash[:12]} cannot resume config {config_hash[:12]}")

    def paths(self) -> list[tuple[int, Path]]:
        """Existing checkpoints, newest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found, reverse=True)

    def due(self, epoch: int, final: bool = False) -> bool:
        if final:
            return True
        if epoch % self.every:
            return False
        return time.monotonic() - self._last_save >= self.min_interval_s

    def save(self, epoch: int, state: dict[str, Any]) -> Path | None:
        """Write the checkpoint of ``epoch``; None (nothing written) when ``allowed`` refuses."""
        if self.allowed is not None and not self.allowed():
            log.warning("checkpoint of epoch %s not written: no longer allowed", epoch)
            return None
        self._refuse_link()  # before mkdir: a dangling link would be a bare FileExistsError
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"epoch": epoch, "config_hash": self.config_hash, "state": state}, buffer)
        payload = buffer.getvalue()
        digest = hashlib.sha256(payload).hexdigest()
        path = self.directory / f"epoch-{epoch:06d}.pt"
        # follow=False: a link planted at these names is replaced, never the file it points to
        atomic_write(path, payload, durable=True, follow=False)
        atomic_write(path.with_name(path.name + ".sha256"), digest.encode(), durable=True, follow=False)
        self._last_save = time.monotonic()
        self.saved_epoch = epoch
        retained = self.retained(epoch)
        if self.on_save is not None and self.on_save(epoch, path, digest) is False:
            return path
        for older_epoch, older in self.paths():  # listed again: what came meanwhile is not ours to judge
            if older_epoch <= epoch and older_epoch not in retained:
                _remove(older)
        return path

    def retained(self, epoch: int) -> list[int]:
        """The epochs whose checkpoints a save of ``epoch`` keeps: the ``keep`` newest up to it,
        and every newer one (it can be the checkpoint of a worker that took the run over while
        this one was writing and lost its lease, or that of another database's run)."""
        found = [e for e, _ in self.paths()]
        return [e for e in found if e > epoch] + [e for e in found if e <= epoch][:self.keep]

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[int, dict[str, Any]] | None:
        """(epoch, state) of the newest checkpoint that verifies, else None (a fresh start).

        An unreadable, corrupted or foreign checkpoint is skipped with a warning and the previous
        one is tried. What a resume leaves behind goes: newer checkpoints, of a history this run
        does not carry on (unusable, or refused by ``usable``), and the temporary files of writes
        a crash cut short (``LEFTOVER_AGE_S`` old). ``on_save`` is told of the checkpoint resumed
        from, so that the store's record names the files left. (A save removes only older
        checkpoints: a newer one can be another worker's, which took the run over while this one
        was writing.)
        """
        self._refuse_link()
        # an hour old: a write of another process (another database sharing the folder) takes seconds
        remove_leftovers(self.directory, ".epoch-*.tmp", _TEMPORARY.match)
        for epoch, path in self.paths():
            try:
                payload = _read_regular(path)
                expected = _read_regular(path.with_name(path.name + ".sha256")).decode().strip()
                if hashlib.sha256(payload).hexdigest() != expected:
                    raise ValueError("sha256 mismatch")
                _refuse_compressed(payload)
                blob = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
                if blob.get("config_hash") != self.config_hash:
                    raise ValueError("checkpoint belongs to another config")
                if blob.get("epoch") != epoch:
                    raise ValueError("epoch in file does not match its name")
            except Exception as exc:  # any failure of the file means: do not trust it
                log.warning("checkpoint %s unusable (%s); trying an older one", path, exc)
                continue
            # asked outside the try: an error of the store (a database blip) is not the file's
            # fault, and must end the resume with every checkpoint left in place
            if self.usable is not None and not self.usable(epoch, expected):
                log.warning("checkpoint %s skipped: the store did not record it, or holds no rows up to its epoch",
                            path)
                continue
            self._remove_after(epoch)
            self.saved_epoch = epoch
            if self.on_save is not None:
                self.on_save(epoch, path, expected)
            return epoch, blob["state"]
        if self.paths():
            log.warning("no usable checkpoint in %s; starting fresh", self.directory)
            self._remove_after(-1)
        return None

    def _refuse_link(self) -> None:
        """A run's folder is named by its config hash, which anyone can compute: a link planted
        there would have its checkpoints written, and files of checkpoint names pruned, wherever
        it points. (The checkpoint root itself may be a link: the user's choice.)"""
        if self.directory.is_symlink():
            raise ValueError(f"{self.directory} is a symbolic link: no checkpoint is read or written through it "
                             "(remove it; the run's folder is made anew)")

    def _remove_after(self, epoch: int) -> None:
        for later, path in self.paths():
            if later > epoch:
                _remove(path)


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; OSError or ValueError otherwise (a FIFO
    there would block the worker for good, holding its lease; a link to /dev/zero would fill
    its memory)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def _refuse_compressed(payload: bytes) -> None:
    """torch.save stores its records uncompressed; a compressed one is not ours, and torch.load
    would inflate it whole (a 1 MB file to 1 GB of memory)."""
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
            raise ValueError("holds compressed records, which torch.save never writes")


def _remove(path: Path) -> None:
    """A checkpoint file and its digest."""
    for p in (path, path.with_name(path.name + ".sha256")):
        p.unlink(missing_ok=True)
