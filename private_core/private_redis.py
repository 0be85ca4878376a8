"""The private tier's own Redis: clients, the checks before serving, and failing closed.

Budgets (``private_redis_budgets``) and signatures (``private_redis_signatures``) share it.
Every wait is bounded by ``timeout_s``; a store that cannot answer refuses the request
(``Unavailable``, 503 / UNAVAILABLE through ``shared.errors``), logged once per
``WARN_EVERY_S`` as ``private_store_unavailable``. Connections are made on demand, so the tier
serves again by itself once the store is back (``private_store_recovered``).

Before serving, ``check_private_store`` refuses (``PrivateStoreRefused``, logged as
``private_store_refused``) a store that answers without the password, one the deployment's
public settings name (the public tier's own), and a wrong password.
"""

from __future__ import annotations

import os
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from private_core.private_redis_settings import StateStoreSettings
from shared.errors import Unavailable
from shared.logs import get_logger

log = get_logger(__name__)
WARN_EVERY_S = 10.0
STORE_UNAVAILABLE = "the private tier's state store is unreachable"
# Any failure of the store refuses the request: a check that cannot decide never admits.
STORE_FAILURES: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
PUBLIC_REDIS_ENV = "SPLITVAULT_PUBLIC_PROTECTION__REDIS_URL"


class PrivateStoreRefused(RuntimeError):
    """The configured store is not one the private tier may trust (see the module)."""


def _options(settings: StateStoreSettings, *, authenticated: bool = True) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout_s,
        "socket_connect_timeout": settings.timeout_s,
    }
    if authenticated:
        options.update(username=settings.username, password=settings.secret())
    if settings.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.tls_ca_file)
    return options


def sync_client(settings: StateStoreSettings, *, authenticated: bool = True) -> redis.Redis:
    """A blocking client (signature checks run in worker threads)."""
    options = _options(settings, authenticated=authenticated)
    # One retry: a pooled socket the server closed meanwhile.
    return redis.Redis.from_url(_url(settings), retry=Retry(NoBackoff(), 1), **options)


def async_client(settings: StateStoreSettings) -> redis.asyncio.Redis:
    """An asyncio client (budgets are decided on the event loop)."""
    retry = AsyncRetry(NoBackoff(), 1)
    return redis.asyncio.Redis.from_url(_url(settings), retry=retry, **_options(settings))


def _url(settings: StateStoreSettings) -> str:
    if settings.redis_url is None:
        raise ValueError("no private store configured (state_store.redis_url)")
    return settings.redis_url


@dataclass
class StoreHealth:
    """Whether the store answered last time; logs the transitions (thread-safe)."""

    _down_since: float | None = None
    _warned_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def down(self, error: BaseException) -> Unavailable:
        """Log (at most once per ``WARN_EVERY_S``) and return the refusal to raise."""
        now = time.monotonic()
        with self._lock:
            if self._down_since is None:
                self._down_since = now
            warn, since = now - self._warned_at >= WARN_EVERY_S, self._down_since
            if warn:
                self._warned_at = now
        if warn:
            log.error(
                "private_store_unavailable",
                error=f"{type(error).__name__}: {error}",
                action="refusing with 503",
                down_for_s=round(now - since, 3),
            )
        return Unavailable(STORE_UNAVAILABLE, retry_after_s=1.0)

    def up(self) -> None:
        """The store answered: log the recovery once."""
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
            self._warned_at = float("-inf")
        if since is not None:
            log.info("private_store_recovered", down_for_s=round(time.monotonic() - since, 3))


def check_private_store(settings: StateStoreSettings, deploy: Path | None) -> None:
    """Refuse a store the public tier could write: one that answers without the password, or
    the one the deployment's public settings (``deploy``/public/public.toml) name."""
    try:
        secret = settings.secret()
    except (OSError, ValueError) as error:
        _refuse(f"its password cannot be read ({type(error).__name__}: {error})")
    public_url = _public_store_url(deploy)
    if public_url is not None:
        if _endpoint(public_url) == _endpoint(_url(settings)):
            _refuse("it is the public tier's store (its settings name the same server)")
        if urlsplit(public_url).password == secret:
            _refuse("its password is the public tier's store's")
    try:
        _check_credentials(settings)
    except redis.exceptions.AuthenticationError:
        _refuse("its password (state_store.password_file) is refused")
    except STORE_FAILURES as error:
        _refuse(f"it cannot be reached ({type(error).__name__}: {error})")
    log.info("private_store_ready", store=_endpoint(_url(settings)))


def _check_credentials(settings: StateStoreSettings) -> None:
    """A stranger is refused (NOAUTH or NOPERM) and the password is accepted."""
    with sync_client(settings, authenticated=False) as anonymous:
        try:
            anonymous.ping()
        except redis.exceptions.AuthenticationError:
            pass  # what a store of the private tier's own answers a stranger
        except redis.exceptions.ResponseError as error:
            if not str(error).startswith(("NOAUTH", "NOPERM")):
                raise
        else:
            _refuse("it answers without a password, so any host that reaches it can write it")
    with sync_client(settings) as client:
        client.ping()


def _refuse(reason: str) -> NoReturn:
    log.error("private_store_refused", reason=reason, hint="README.md, 'Several private replicas'")
    raise PrivateStoreRefused(f"refusing the private tier's state store: {reason}")


def _public_store_url(deploy: Path | None) -> str | None:
    """The public tier's Redis URL, where this host can read it (its environment, or the
    deployment's public.toml: a demo or compose host holding both tiers)."""
    url = os.environ.get(PUBLIC_REDIS_ENV)
    config = deploy / "public" / "public.toml" if deploy is not None else None
    if not url and config is not None and config.is_file():
        protection = tomllib.loads(config.read_text("utf-8")).get("protection", {})
        url = protection.get("redis_url") if isinstance(protection, dict) else None
    return str(url) if url else None


def _endpoint(url: str) -> str:
    """A server's address, without credentials or database: what two URLs share when they
    name one server."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{os.path.realpath(parts.path)}"
    return f"tcp:{(parts.hostname or 'localhost').lower()}:{parts.port or 6379}"
