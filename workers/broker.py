"""The broker URL's checks, made before a command writes anything or a worker starts.

kombu accepts a bad URL until its first publish, which failed with a long traceback after the
runs were already written. Each refusal here is a ``ConfigError`` naming ``KANFARM_BROKER_URL``;
no message echoes the URL, which may hold a password.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from kanfarm.config import ConfigError
from workers.celery_app import BROKER_ENV, broker_url

#: a URL scheme as RFC 3986 spells it, short enough to be one (a longer "scheme" is likely a password)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,15}")


def broker_urls() -> list[str]:
    """The broker URL, or each of a failover list (``redis://a;redis://b``, as kombu takes it)."""
    return [url.strip() for url in broker_url().split(";") if url.strip()] or [""]


def _refuse(message: str) -> None:
    raise ConfigError(BROKER_ENV, message)


def check_url() -> None:
    """Refuse a URL of another scheme than Redis's, a malformed host, port or database number, or a
    query option kombu does not take (no connection is made)."""
    for url in broker_urls():
        scheme, sep, _ = url.partition("://")
        if not sep or not _SCHEME.fullmatch(scheme):
            _refuse("not a URL: use redis://host:6379/0")
        if scheme.lower() not in ("redis", "rediss"):
            _refuse(f"unsupported broker scheme {scheme.lower()!r}: use redis://host:6379/0")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError: not a number, or not 0-65535)
        except ValueError:
            _refuse("malformed host or port: use redis://host:6379/0")
        database = parts.path.strip("/")
        if database and not (database.isascii() and database.isdigit()):
            _refuse("what follows the host must be a database number: use redis://host:6379/0")
        _check_options(url)


def _check_options(url: str) -> None:
    """The URL's query options, as kombu reads them: one it does not take failed the publish."""
    from kombu import Connection

    try:
        Connection(url).release()
    except (TypeError, KeyError, ValueError) as exc:
        _refuse(f"an option of the URL (after '?') is not one the broker client takes ({type(exc).__name__}); "
                "kombu's Redis transport takes e.g. ?ssl_cert_reqs=required with rediss://")


def check_answers() -> None:
    """Refuse a broker that answers but turns the URL down: a database number the server does not
    have, a wrong password. A broker that does not answer, or options redis-py does not take
    (kombu's own), are left to the publish step, whose runs stay queued for ``kanfarm requeue``.
    Of a failover list, the first URL is asked."""
    import redis

    try:
        client = redis.Redis.from_url(broker_urls()[0], socket_connect_timeout=2, socket_timeout=2)
    except (ValueError, TypeError):
        return
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as exc:  # the server's words, no URL in them
        _refuse(f"the broker refused the URL: {str(exc).splitlines()[0]}")
    except (redis.RedisError, ValueError, TypeError):
        return
    finally:
        client.close()
