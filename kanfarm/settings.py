"""Settings read from the environment: one parser per kind of value.

Each refuses a bad value with a ``ConfigError`` naming the variable (the CLI prints it as one
line, exit 2), so a typo never silently means the default. Unset or empty means the default.
"""
from __future__ import annotations

import math
import os

from kanfarm.config import ConfigError


def env_flag(name: str, default: bool) -> bool:
    """1/true/yes/on or 0/false/no/off, any case."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value == "":
        return default
    raise ConfigError(name, f"{value!r}: use 1 (on) or 0 (off)")


#: the largest integer setting taken (a 32-bit SQL integer's)
MAX_INT = 2**31 - 1
#: the largest number setting taken: 31 years of seconds (a lease of 1e12 s overflowed datetime)
MAX_NUMBER = 1e9


def env_number(name: str, default: float, *, kind: type = float, zero: bool = False, unit: str = "") -> float:
    """A finite number of ``kind`` as Python writes one (ASCII: int("٣") would be 3), above 0, or at
    least 0 with ``zero``. ``unit`` names what it counts in the refusal ("seconds")."""
    if kind not in (int, float):
        raise TypeError(f"kind must be int or float, not {kind!r}")
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw) if raw.isascii() else None
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or value < 0 or (value == 0 and not zero):
        what = ("a non-negative" if zero else "a positive") + (" integer" if kind is int else " number")
        raise ConfigError(name, f"{raw!r} must be {what}" + (f" of {unit}" if unit else ""))
    if value > (MAX_INT if kind is int else MAX_NUMBER):  # it meets SQL, datetimes and timeouts
        raise ConfigError(name, f"{raw!r} must be at most {MAX_INT if kind is int else f'{MAX_NUMBER:g}'}")
    return value
