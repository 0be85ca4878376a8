"""The clients' connection settings: URL, headers, timeout, TLS context and retry policy.

Checked once, when a client is made: a missing CA or certificate file is named, an unreadable
one is a ``TLSError``, and a plain ``http://`` URL to another machine draws an
``InsecureTransportWarning``. The API key lives only in ``headers``, an ``httpx.Headers``
whose repr shows ``[secure]`` in its place.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import ssl
import warnings
from dataclasses import dataclass

import certifi
import httpx

from ._exceptions import TLSError
from ._outcomes import RetryPolicy
from ._protocol import __version__

StrPath = str | os.PathLike[str]


class InsecureTransportWarning(UserWarning):
    """A client was pointed at ``http://`` on another machine: nothing it sends is encrypted."""


@dataclass(frozen=True)
class Settings:
    """Validated constructor arguments shared by ``Client`` and ``AsyncClient``."""

    base_url: str
    headers: httpx.Headers  # its repr masks Authorization
    timeout: float
    verify: ssl.SSLContext
    retry: RetryPolicy


def make_settings(
    url: str,
    *,
    api_key: str | None,
    ca: StrPath | None,
    cert: tuple[StrPath, StrPath] | None,
    timeout: float,
    retry: RetryPolicy,
    stacklevel: int = 1,
) -> Settings:
    """Check the client's arguments and build its headers and TLS context.

    ``stacklevel`` points the plain-HTTP warning at a caller's line (1: the caller's).
    """
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"url must start with http:// or https://, got {url!r}")
    if not timeout > 0:
        raise ValueError("timeout must be positive")
    if retry.retries < 0 or retry.backoff < 0 or retry.max_backoff < 0:
        raise ValueError("retries, backoff and max_backoff must not be negative")
    headers = httpx.Headers(
        {"Accept": "application/json", "User-Agent": f"splitvault-client/{__version__}"}
    )
    if api_key is not None:
        if not api_key.strip():
            raise ValueError("api_key must not be empty")
        headers["Authorization"] = f"Bearer {api_key}"
    if parsed.scheme == "http" and not is_loopback(parsed.host):
        _warn_plain_http(parsed.host, api_key is not None, stacklevel + 2)
    return Settings(url, headers, timeout, ssl_context(ca, cert), retry)


def ssl_context(ca: StrPath | None, cert: tuple[StrPath, StrPath] | None) -> ssl.SSLContext:
    """A verifying TLS context trusting ``ca`` (else certifi's bundle), presenting ``cert``.

    A file that does not exist raises ``FileNotFoundError`` naming it; one that is not what it
    should be (not PEM, a key that does not match its certificate) raises ``TLSError``.
    """
    cafile = certifi.where() if ca is None else _existing(ca, "CA certificate (ca=)")
    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as error:
        raise TLSError(f"ca={cafile!r} holds no PEM certificate ({error.strerror})") from error
    if cert is not None:
        certfile = _existing(cert[0], "client certificate (cert=)")
        keyfile = _existing(cert[1], "client key (cert=)")
        try:
            context.load_cert_chain(certfile, keyfile)
        except ssl.SSLError as error:
            raise TLSError(
                f"cert=({certfile!r}, {keyfile!r}) is not a PEM certificate and its matching "
                f"private key ({error.strerror})"
            ) from error
    return context


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _existing(path: StrPath, what: str) -> str:
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(errno.ENOENT, f"{what} file not found", name)
    return name


def _warn_plain_http(host: str, with_key: bool, stacklevel: int) -> None:
    exposed = "the API key, inputs and answers" if with_key else "inputs and answers"
    warnings.warn(
        f"http://{host} is not encrypted: {exposed} cross the network in clear text; "
        "use https:// (plain HTTP is meant for localhost only)",
        InsecureTransportWarning,
        stacklevel=stacklevel,
    )
