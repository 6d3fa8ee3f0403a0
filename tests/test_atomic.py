"""atomic_write: readers see the old file or the new one, never half, and nothing else is touched."""
from __future__ import annotations

import os
import stat

import pytest

from kanfarm.atomic import atomic_write, atomic_writer


def test_a_planted_symlink_at_a_guessable_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("ORIGINAL")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f".report.html.{os.getpid()}.tmp").symlink_to(victim)
    atomic_write(shared / "report.html", b"new page")
    assert victim.read_text() == "ORIGINAL"
    assert (shared / "report.html").read_bytes() == b"new page"


def test_a_replaced_file_keeps_its_permissions_and_a_new_one_follows_the_umask(tmp_path):
    private = tmp_path / "private.csv"
    private.write_text("old")
    private.chmod(0o600)
    atomic_write(private, b"new", durable=True)
    assert (private.read_bytes(), stat.S_IMODE(private.stat().st_mode)) == (b"new", 0o600)
    old_umask = os.umask(0o027)
    try:
        atomic_write(tmp_path / "fresh.csv", b"x")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "fresh.csv").stat().st_mode) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "figure.png"
    target.write_bytes(b"old")

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, b"x")


def test_a_write_error_names_the_file(tmp_path):
    """A full disk's ENOSPC from write() or fsync() names no file; the error says which, so that
    the runner can tell which folder's setting to name."""
    import errno

    with pytest.raises(OSError) as caught:
        with atomic_writer(tmp_path / "epoch-000003.pt", durable=True) as f:
            f.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(tmp_path / "epoch-000003.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_device_a_fifo_and_a_symlink_are_written_through_not_replaced(tmp_path):
    """``--out /dev/null`` or ``/dev/stdout`` (a link to a pipe or a terminal): a rename would put a
    regular file in their place. (Not tried on /dev/null itself: a regression would replace it.)"""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    stdout_like = tmp_path / "stdout"
    stdout_like.symlink_to(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so the writer's open does not block
    try:
        atomic_write(fifo, b"through the pipe, ")
        atomic_write(stdout_like, b"and through a link to it")
        assert os.read(reader, 100) == b"through the pipe, and through a link to it"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stdout_like.is_symlink()

    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    atomic_write(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.csv", "real.csv", "stdout"]


def test_temporaries_a_killed_write_left_go_at_the_next_write_of_that_file(tmp_path):
    """A kill -9 during `export --out long.csv` left .long.csv.XXXX.tmp for good."""
    import time

    from kanfarm.atomic import LEFTOVER_AGE_S

    old, recent, other = (tmp_path / ".long.csv.ab12cd.tmp", tmp_path / ".long.csv.ef34gh.tmp",
                          tmp_path / ".other.csv.ij56kl.tmp")
    for path in (old, recent, other):
        path.write_bytes(b"partial")
    for path in (old, other):
        os.utime(path, (time.time() - LEFTOVER_AGE_S - 60,) * 2)
    atomic_write(tmp_path / "long.csv", b"a,b\n")
    assert (tmp_path / "long.csv").read_bytes() == b"a,b\n"
    assert not old.exists() and recent.exists() and other.exists()  # a live write, another file's
