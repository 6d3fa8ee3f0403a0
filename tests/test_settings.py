"""kanfarm.settings: every environment setting is parsed by one of these, and a bad value is a
ConfigError naming the variable, never the default in disguise."""
from __future__ import annotations

import pytest

from kanfarm.config import ConfigError
from kanfarm.settings import env_flag, env_number


@pytest.mark.parametrize("raw, kind, zero, expected", [
    ("", int, False, 7), ("  ", float, False, 7), ("3", int, False, 3), (" 3 ", int, False, 3),
    ("2.5", float, False, 2.5), ("0", float, True, 0.0), ("1e3", float, False, 1000.0), ("+3", int, False, 3),
    ("1_000", int, False, 1000), (str(2**31 - 1), int, False, 2**31 - 1),
])
def test_env_number_takes(monkeypatch, raw, kind, zero, expected):
    monkeypatch.setenv("KANFARM_X", raw)
    value = env_number("KANFARM_X", 7, kind=kind, zero=zero)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("raw, kind, zero, words", [
    ("abc", float, False, "a positive number"), ("1.5", int, False, "a positive integer"),
    ("0", int, False, "a positive integer"), ("0", float, False, "a positive number"),
    ("-1", float, True, "a non-negative number"), ("nan", float, True, "non-negative"),
    ("inf", float, False, "positive"), ("\u00b2", int, False, "integer"), ("-3", int, False, "integer"),
    ("\u0663", int, False, "integer"), ("\u0663", float, False, "number"), ("9" * 400, float, False, "number"),
    ("9" * 400, int, False, "at most"), (str(2**31), int, False, "at most"), ("-0.5", float, True, "non-negative"), ("1e12", float, False, "at most 1e+09"),
])
def test_env_number_refuses_naming_the_variable(monkeypatch, raw, kind, zero, words):
    monkeypatch.setenv("KANFARM_X", raw)
    with pytest.raises(ConfigError) as caught:
        env_number("KANFARM_X", 7, kind=kind, zero=zero, unit="seconds")
    assert caught.value.field == "KANFARM_X" and words in str(caught.value)
    assert words.startswith("at most") or str(caught.value).endswith("seconds")


def test_env_number_takes_int_or_float_kinds_only(monkeypatch):
    monkeypatch.setenv("KANFARM_X", "3")
    with pytest.raises(TypeError):
        env_number("KANFARM_X", 7, kind=str)


@pytest.mark.parametrize("raw, expected", [("", True), ("0", False), ("OFF", False), (" yes ", True), ("On", True)])
def test_env_flag(monkeypatch, raw, expected):
    monkeypatch.setenv("KANFARM_F", raw)
    assert env_flag("KANFARM_F", True) is expected


def test_env_flag_refuses_a_typo(monkeypatch):
    monkeypatch.setenv("KANFARM_F", "ture")
    with pytest.raises(ConfigError, match="KANFARM_F: 'ture'"):
        env_flag("KANFARM_F", True)


@pytest.mark.parametrize("raw, expected", [("", 12 * 3600), ("3600.5", 3600), ("3600.7", 3600), ("1", 1), ("0.5", None),
                                           ("0", None)])
def test_visibility_timeout_is_whole_seconds_and_at_least_one(monkeypatch, raw, expected):
    from workers.celery_app import VISIBILITY_ENV, visibility_timeout

    monkeypatch.setenv(VISIBILITY_ENV, raw)
    if expected is None:
        with pytest.raises(ConfigError, match=VISIBILITY_ENV):
            visibility_timeout()
    else:
        assert visibility_timeout() == expected
