"""What a run needs of the machine it trains on, checked before anything is claimed or written.

The settings a run reads from the environment, the checkpoint and data folders it writes, and
which errors are the machine's (a full or read-only disk) rather than a run's own: those hand the
run back and stop the worker instead of failing every run it would take in turn.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from kanfarm.config import ConfigError, check_folder
from kanfarm.data import data_dir
from kanfarm.settings import env_number
from kanfarm.training.host_memory import keep_freed_memory_wanted

#: a run or pack checkpoints at most this often (and at its last epoch, and when it stops): tiny
#: models would otherwise spend their time writing checkpoints. ``KANFARM_CHECKPOINT_SECONDS`` overrides it.
CHECKPOINT_S = 30.0
#: a run that has written no epoch for this long (and for ``runner.STALL_FACTOR`` times the
#: longest it has taken between two epochs) is taken for hung: see ``runner._Heartbeat``
STALL_S = 1800.0
#: bytes the checkpoint folder's check writes before a claim (``check_checkpoints_writable``)
PROBE_BYTES = 64 * 1024
#: errors of a whole file system, not of a run: a full disk or quota, a read-only mount. The run
#: is handed back and the worker stops (``environment_fault``). A permission error stays the run's:
#: it can be one run's folder, and every worker stopping on that run in turn would stop the farm.
FILE_SYSTEM_FAULTS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS))


def checkpoint_root() -> Path:
    """``KANFARM_CHECKPOINT_DIR``, else (unset or empty) ``./kanfarm-checkpoints``; absolute, so the
    store records where a run's checkpoints are, whatever folder a resume starts in."""
    return Path(os.environ.get("KANFARM_CHECKPOINT_DIR") or "kanfarm-checkpoints").absolute()


def checkpoint_settings() -> tuple[int, int]:
    """(every, keep) from ``KANFARM_CHECKPOINT_EVERY`` (default 1) and ``KANFARM_CHECKPOINT_KEEP`` (2).

    Read before a run is claimed, so a bad value claims nothing."""
    every = env_number("KANFARM_CHECKPOINT_EVERY", 1, kind=int)
    keep = env_number("KANFARM_CHECKPOINT_KEEP", 2, kind=int)
    check_folder("KANFARM_CHECKPOINT_DIR", checkpoint_root())
    return every, keep


def check_checkpoints_writable(leave_nothing: bool = False) -> None:
    """The checkpoint folder can be created and written (a file of ``PROBE_BYTES`` made and
    removed: an empty one is made even on a full disk), before a claim: a worker whose folder is
    read-only, missing its mount or full would fail every run it took (ConfigError naming
    ``KANFARM_CHECKPOINT_DIR`` instead, nothing claimed). ``leave_nothing``:
    remove the folders the check made (a command checking its input; not before a claim, where
    another worker process may be about to write into them)."""
    import tempfile

    root = checkpoint_root()
    missing = [p for p in (root, *root.parents) if not p.exists()] if leave_nothing else []  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-") as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
    except OSError as exc:
        raise ConfigError("KANFARM_CHECKPOINT_DIR", f"{str(root)!r} cannot be written "
                          f"({exc.strerror or type(exc).__name__})") from None
    finally:  # a check leaves nothing behind (a command may still refuse its input after it)
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:  # made meanwhile by a run, or never made
                pass


def check_run_environment() -> None:
    """Every setting a run reads from the environment, checked (ConfigError) before a command
    writes anything: a bad value is one message, not a grid stored and then nothing trained."""
    from kanfarm.data.paths import offline
    from kanfarm.models.compiled_spline import cpu_compile_wanted
    from kanfarm.models.uniform_spline import triton_wanted

    checkpoint_settings()
    check_checkpoints_writable(leave_nothing=True)  # the commands that call this train here
    checkpoint_interval()
    stall_seconds()
    triton_wanted()
    cpu_compile_wanted()
    keep_freed_memory_wanted()
    offline()
    check_folder("KANFARM_DATA_DIR", data_dir())


def checkpoint_interval() -> float:
    """Seconds between a run's (or a pack's) checkpoints, from ``KANFARM_CHECKPOINT_SECONDS``
    (default ``CHECKPOINT_S``; 0 = whenever ``KANFARM_CHECKPOINT_EVERY`` says). Read before a claim."""
    if os.environ.get("KANFARM_PACK_CHECKPOINT_SECONDS"):  # its old name: ignoring it would change the cadence unsaid
        raise ConfigError("KANFARM_PACK_CHECKPOINT_SECONDS", "renamed KANFARM_CHECKPOINT_SECONDS (it now applies to "
                          "single runs too): set that one instead")
    return env_number("KANFARM_CHECKPOINT_SECONDS", CHECKPOINT_S, zero=True, unit="seconds")


def stall_seconds() -> float:
    """``KANFARM_STALL_SECONDS`` (default ``STALL_S``; 0 = never): see ``runner._Heartbeat``. Read before a claim."""
    return env_number("KANFARM_STALL_SECONDS", STALL_S, zero=True, unit="seconds")


def environment_fault(exc: BaseException) -> ConfigError | None:
    """A file-system error of this machine (``FILE_SYSTEM_FAULTS``), raised or the cause of what
    was raised (a download wraps it in DatasetUnavailable), as the ConfigError a worker stops on,
    naming the setting whose folder it hit (the innermost, where one holds the other); None for
    any other error. Not the run's fault: it is handed back, not failed, and finishes once the
    disk is fixed."""
    seen: set[int] = set()  # a chain of causes can be a loop
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in FILE_SYSTEM_FAULTS:
            break
        seen.add(id(exc))
        exc = exc.__cause__
    else:
        return None
    assert isinstance(exc, OSError)
    where = Path(os.path.abspath(exc.filename)) if isinstance(exc.filename, str) else None
    name, deepest = "file system", -1
    for setting, root in (("KANFARM_CHECKPOINT_DIR", checkpoint_root()), ("KANFARM_DATA_DIR", data_dir())):
        root = Path(os.path.abspath(root))
        if where is not None and where.is_relative_to(root) and len(root.parts) > deepest:
            name, deepest = setting, len(root.parts)
    what = repr(exc.filename) if where is not None else "a file"
    return ConfigError(name, f"{what} cannot be written ({exc.strerror or type(exc).__name__}); "
                             "the run was handed back and resumes once that is fixed")
