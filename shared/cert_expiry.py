"""Warn well before a tier's own certificates expire: at startup, then periodically.

Each tier hands ``watch_certificates`` the certificate files it loaded at startup (its server and
client certificates and the CA certificate). The certificates are read once, at that moment, so
the warnings describe what the running process presents, not what a later rotation put on disk.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from shared.logs import get_logger

log = get_logger(__name__)
CHECK_INTERVAL_S = 24 * 3600.0


@dataclass(frozen=True)
class LoadedCertificate:
    """A certificate as a tier loaded it, and the file it came from."""

    path: Path
    cert: x509.Certificate

    @classmethod
    def read(cls, path: Path) -> LoadedCertificate:
        """The first certificate in a PEM file."""
        return cls(path, x509.load_pem_x509_certificate(path.read_bytes()))

    def days_left(self, now: dt.datetime) -> float:
        """Days until the certificate expires (negative once it has)."""
        return (self.cert.not_valid_after_utc - now).total_seconds() / 86400


def check_certificates(
    certificates: Sequence[LoadedCertificate],
    warning_days: float,
    now: dt.datetime | None = None,
) -> list[LoadedCertificate]:
    """Log each certificate that expires within ``warning_days``, has expired or is not yet
    valid; return those certificates."""
    now = now or dt.datetime.now(dt.UTC)
    flagged = []
    for loaded in certificates:
        cert = loaded.cert
        fields = {
            "path": str(loaded.path),
            "subject": cert.subject.rfc4514_string(),
            "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "days_left": round(loaded.days_left(now), 1),
        }
        if now < cert.not_valid_before_utc:
            log.error("certificate_not_yet_valid", **fields)
        elif now >= cert.not_valid_after_utc:
            log.error("certificate_expired", **fields)
        elif loaded.days_left(now) < warning_days:
            log.warning("certificate_expiring", warning_days=warning_days, **fields)
        else:
            continue
        flagged.append(loaded)
    return flagged


def watch_certificates(
    paths: Sequence[Path], warning_days: float, interval_s: float = CHECK_INTERVAL_S
) -> threading.Event:
    """Read ``paths`` now, check them now and every ``interval_s`` in a daemon thread.

    Returns an event that stops the thread when set. A file that cannot be read is logged as
    ``certificate_unreadable`` and skipped.
    """
    loaded = []
    for path in paths:
        try:
            loaded.append(LoadedCertificate.read(path))
        except (OSError, ValueError) as error:
            log.error("certificate_unreadable", path=str(path), reason=str(error))
    stop = threading.Event()
    check_certificates(loaded, warning_days)

    def run() -> None:
        while not stop.wait(interval_s):
            check_certificates(loaded, warning_days)

    threading.Thread(target=run, name="certificate-expiry", daemon=True).start()
    return stop
