"""Where raw dataset files and their caches live: ``$KANFARM_DATA_DIR/<dataset>/``."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path("~/.cache/kanfarm/data")


def data_dir() -> Path:
    """The root folder of all datasets: ``KANFARM_DATA_DIR`` if set, else ``~/.cache/kanfarm/data``."""
    return Path(os.environ.get("KANFARM_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def offline() -> bool:
    """True when ``KANFARM_OFFLINE`` asks never to download (1/true/yes)."""
    return os.environ.get("KANFARM_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
