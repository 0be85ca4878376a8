"""Certificate expiry warnings: which certificates are flagged, and the periodic check."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from shared.cert_expiry import LoadedCertificate, check_certificates, watch_certificates
from splitvault.pki import CertKeyPair, create_ca, issue_certificate


@pytest.fixture(scope="module")
def ca() -> CertKeyPair:
    return create_ca()


def _cert(ca: CertKeyPair, tmp_path: Path, name: str, days: int, start_days: float = 0) -> Path:
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=start_days)
    pair = issue_certificate(ca, name, server=True, client=False, valid_days=days, not_before=start)
    path = tmp_path / f"{name}.crt"
    pair.write(path, None)
    return path


def test_only_certificates_near_or_past_expiry_are_flagged(ca: CertKeyPair, tmp_path: Path) -> None:
    certs = [
        LoadedCertificate.read(_cert(ca, tmp_path, name, days, start))
        for name, days, start in [
            ("fine", 100, 0),
            ("soon", 10, 0),
            ("expired", 1, -2),
            ("future", 5, 1),
        ]
    ]
    with capture_logs() as logs:
        flagged = check_certificates(certs, warning_days=30)
    assert [c.path.stem for c in flagged] == ["soon", "expired", "future"]
    events = {log["subject"]: log for log in logs}
    assert set(events) == {"CN=soon", "CN=expired", "CN=future"}
    soon = events["CN=soon"]
    assert (soon["event"], soon["log_level"]) == ("certificate_expiring", "warning")
    assert 9.9 <= soon["days_left"] <= 10 and soon["path"].endswith("soon.crt")
    assert events["CN=expired"]["event"] == "certificate_expired"
    assert events["CN=future"]["event"] == "certificate_not_yet_valid"


def test_warning_days_zero_disables_the_warning(ca: CertKeyPair, tmp_path: Path) -> None:
    cert = LoadedCertificate.read(_cert(ca, tmp_path, "soon", 10))
    with capture_logs() as logs:
        assert check_certificates([cert], warning_days=0) == []
    assert logs == []


def test_watch_checks_at_start_and_periodically(ca: CertKeyPair, tmp_path: Path) -> None:
    path = _cert(ca, tmp_path, "soon", 10)
    with capture_logs() as logs:
        stop = watch_certificates([path, tmp_path / "missing.crt"], 30, interval_s=0.05)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if sum(log["event"] == "certificate_expiring" for log in logs) >= 3:
                    break
                time.sleep(0.02)
        finally:
            stop.set()
    expiring = [log for log in logs if log["event"] == "certificate_expiring"]
    assert len(expiring) >= 3
    assert [log["event"] for log in logs if "missing" in log.get("path", "")] == [
        "certificate_unreadable"
    ]
