"""Tests of ``splitvault keys`` and ``splitvault audit`` on a real deployment folder."""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from pathlib import Path

import pytest

from public_api.audit import AuditRecord
from public_api.audit_writer import AuditTrail
from public_api.keys import SqliteKeyStore
from shared.errors import Unauthenticated
from splitvault.admin import add_admin_commands


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="splitvault")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.run(args))


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    (tmp_path / "deploy" / "public").mkdir(parents=True)
    return tmp_path / "deploy"


def _keys(deploy: Path) -> SqliteKeyStore:
    return SqliteKeyStore(deploy / "public" / "state" / "keys.sqlite3")


def _create(deploy: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, str]:
    assert _run("keys", "create", "--deploy", str(deploy), *extra) == 0
    out = capsys.readouterr().out
    key_id = re.search(r"created API key (k_[0-9a-f]{8})", out)
    secret = re.search(r"^  (sv_\S+)$", out, re.MULTILINE)
    assert key_id and secret, out
    return key_id.group(1), secret.group(1)


def test_keys_create_prints_the_secret_once_with_a_warning(
    deploy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run("keys", "create", "--deploy", str(deploy), "--name", "alice", "--rate", "2") == 0
    out = capsys.readouterr().out
    assert "shown this once only" in out and "cannot be shown again" in out
    assert "rate=2/s" in out
    secret = re.search(r"^  (sv_\S+)$", out, re.MULTILINE)
    assert secret is not None
    store = _keys(deploy)
    try:
        key = store.authenticate(secret.group(1))
        assert (key.name, key.rate_per_s, key.burst, key.daily_quota) == ("alice", 2.0, None, None)
        assert f"created API key {key.key_id}" in out
    finally:
        store.close()


def test_keys_list_shows_limits_revocation_and_accepted_terms(
    deploy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run("keys", "list", "--deploy", str(deploy)) == 0
    assert capsys.readouterr().out == "no API keys\n"
    alice, _ = _create(deploy, capsys, "--name", "alice", "--burst", "5", "--quota", "1000")
    bob, _ = _create(deploy, capsys, "--name", "bob")
    store = _keys(deploy)
    store.record_acceptance(alice, "2024-06", "a" * 64, "10.0.0.1", at=1.0)
    store.close()
    assert _run("keys", "revoke", "--deploy", str(deploy), "bob") == 0
    assert f"revoked API key {bob}" in capsys.readouterr().out
    assert _run("keys", "list", "--deploy", str(deploy)) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["ID", "NAME", "CREATED", "REVOKED", "LIMITS", "TERMS"]
    assert len(rows) == 2
    assert rows[0].startswith(alice) and "burst=5 quota=1000/day" in rows[0]
    assert rows[0].endswith("2024-06")
    assert rows[1].startswith(bob) and "model defaults" in rows[1] and rows[1].endswith("-")
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", rows[1].split("bob")[1])
    assert len(re.findall(r"\d{4}-\d\d-\d\d", rows[1])) == 2  # created and revoked
    assert len(re.findall(r"\d{4}-\d\d-\d\d", rows[0])) == 1  # not revoked


def test_keys_revoke_refuses_the_key_and_reports_unknown_ones(
    deploy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_id, secret = _create(deploy, capsys, "--name", "alice")
    assert _run("keys", "revoke", "--deploy", str(deploy), key_id) == 0
    store = _keys(deploy)
    try:
        with pytest.raises(Unauthenticated, match=f"API key {key_id} was revoked"):
            store.authenticate(secret)
    finally:
        store.close()
    capsys.readouterr()
    assert _run("keys", "revoke", "--deploy", str(deploy), "nobody") == 1
    assert "no API key with id or name 'nobody'" in capsys.readouterr().err


def test_invalid_requests_raise_the_errors_the_cli_maps(
    deploy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _create(deploy, capsys, "--name", "alice")
    with pytest.raises(ValueError, match="already exists"):
        _run("keys", "create", "--deploy", str(deploy), "--name", "alice")
    with pytest.raises(ValueError, match="rate must be positive"):
        _run("keys", "create", "--deploy", str(deploy), "--name", "x", "--rate", "-1")
    missing = deploy.parent / "elsewhere"
    with pytest.raises(FileNotFoundError, match="deployment folder"):
        _run("keys", "list", "--deploy", str(missing))
    assert not missing.exists()
    with pytest.raises(FileNotFoundError, match="no audit trail"):
        _run("audit", "verify", "--deploy", str(deploy))


def _audit(deploy: Path, keys: tuple[str, str] = ("k_0000000a", "k_0000000b")) -> Path:
    path = deploy / "public" / "state" / "audit.sqlite3"
    with AuditTrail.open(path) as trail:
        for i in range(6):
            trail.append(
                AuditRecord(
                    time=1_700_000_000.0 + i,
                    key_id=keys[i % 2],
                    client="10.0.0.1",
                    model="digits",
                    input_sha256="ab" * 32,
                    answer='{"label":7}',
                    decision="served",
                    status=200,
                    monitor_score=0.1 * i,
                    request_id=f"r{i}",
                )
            )
    return path


def test_audit_verify_passes_then_fails_after_tampering(
    deploy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _audit(deploy)
    assert _run("audit", "verify", "--deploy", str(deploy)) == 0
    out = capsys.readouterr().out
    assert "OK: 6 records" in out and re.search(r"head: record 6, hash [0-9a-f]{64}", out)
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE audit SET answer = '{\"label\":1}' WHERE seq = 3")
    assert _run("audit", "verify", "--deploy", str(deploy)) == 1
    assert "FAILED verification: record 3: hash does not match its contents" in (
        capsys.readouterr().out
    )


def test_audit_export_writes_one_keys_records_as_json_lines(
    deploy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = _create(deploy, capsys, "--name", "alice")
    second, _ = _create(deploy, capsys, "--name", "bob")
    _audit(deploy, (first, second))
    assert _run("audit", "export", "--deploy", str(deploy), "--key", second) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [record["seq"] for record in records] == [2, 4, 6]
    assert {record["key_id"] for record in records} == {second}
    assert all(len(record["hash"]) == 64 for record in records)
    assert f"3 records of {second} (name 'bob')" in captured.err
    out_file = deploy / "evidence.jsonl"
    argv = ("audit", "export", "--deploy", str(deploy), "--key", "alice")  # by name
    assert _run(*argv, "--out", str(out_file)) == 0
    assert f"wrote 3 records of {first} (name 'alice') to {out_file}" in capsys.readouterr().out
    exported = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [record["seq"] for record in exported] == [1, 3, 5]
    assert exported[1]["prev_hash"] == records[0]["hash"]


def test_audit_export_of_an_unknown_key_fails(
    deploy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _create(deploy, capsys, "--name", "alice")
    _audit(deploy)
    with pytest.raises(ValueError, match="no API key with id or name 'alcie'"):
        _run("audit", "export", "--deploy", str(deploy), "--key", "alcie")
