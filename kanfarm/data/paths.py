"""Where raw dataset files and their caches live: ``$KANFARM_DATA_DIR/<dataset>/``."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path("~/.cache/kanfarm/data")


def data_dir() -> Path:
    """The root folder of all datasets: ``KANFARM_DATA_DIR`` if set, else ``~/.cache/kanfarm/data``."""
    return Path(os.environ.get("KANFARM_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def offline() -> bool:
    """True when ``KANFARM_OFFLINE`` asks never to download (1/true/yes/on; 0/false/no/off or
    unset: downloads allowed). Another value is refused, so a typo cannot silently download."""
    from kanfarm.settings import env_flag

    return env_flag("KANFARM_OFFLINE", False)
