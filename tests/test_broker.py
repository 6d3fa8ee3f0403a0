"""workers.broker: the broker URL's checks (no connection made), each refusal a ConfigError that
names KANFARM_BROKER_URL and never echoes the URL."""
from __future__ import annotations

import pytest

from kanfarm.config import ConfigError
from workers.broker import broker_urls, check_url


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "REDIS://127.0.0.1:6379/0", "rediss://h:6380/1",
                                 "redis://127.0.0.1:6379/0;", "redis://a:6379/0;redis://b:6379/0"])
def test_redis_urls_pass(monkeypatch, url):
    monkeypatch.setenv("KANFARM_BROKER_URL", url)
    check_url()


def test_a_failover_list_is_each_of_its_urls(monkeypatch):
    monkeypatch.setenv("KANFARM_BROKER_URL", " redis://a:6379/0 ;; redis://b:6379/0 ;")
    assert broker_urls() == ["redis://a:6379/0", "redis://b:6379/0"]


@pytest.mark.parametrize("url, words", [
    ("redis", "not a URL"), ("localhost:6379", "not a URL"),
    ("averylongtopsecretpassword://h:6379/0", "not a URL"),  # a "scheme" that long is likely a password
    ("amqp://u:topsecret@h//", "unsupported broker scheme 'amqp'"),
    ("redis://h:6379/\u0663", "must be a database number"),
])
def test_bad_broker_urls_are_refused_without_echoing_them(monkeypatch, url, words):
    monkeypatch.setenv("KANFARM_BROKER_URL", url)
    with pytest.raises(ConfigError) as caught:
        check_url()
    assert caught.value.field == "KANFARM_BROKER_URL" and words in str(caught.value)
    assert "topsecret" not in str(caught.value)
