"""The private ledger and its audit anchors: real files, real fsync, real write failures."""

from __future__ import annotations

import json
import resource
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from private_core.anchors import AnchorBook, signing_key_path
from private_core.ledger import GENESIS, Ledger, LedgerUnavailable, read_segment
from private_core.ledger_export import export_anchors
from shared.anchors_file import AnchorsFile
from shared.crypto import MAGIC, DecryptionError
from shared.errors import AnchorConflict, InvalidInput
from shared.keys import LocalFileKeyProvider

CHAIN = "c" * 32
HEADS = [f"{i:064x}" for i in range(1, 10)]
PROVIDER = LocalFileKeyProvider.from_bytes(bytes(range(32)))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger.open(tmp_path, "replica-0")
    yield opened
    opened.close()


def test_records_are_chained_synced_and_reload(tmp_path: Path, ledger: Ledger) -> None:
    first = ledger.append("anchor", {"n": 1})
    second = ledger.append("signing_key", {"n": 2})
    third = ledger.append("anchor", {"n": 3})
    assert (first.prev, second.prev, third.prev) == (GENESIS, first.hash, second.hash)
    assert ledger.seq == 3 and ledger.head == third.hash
    assert [r.payload["n"] for r in ledger.iter("anchor")] == [1, 3]
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.path.parent.stat().st_mode) == 0o700
    with pytest.raises(ValueError, match="unknown ledger record kind"):
        ledger.append("budget", {})
    ledger.close()
    again = Ledger.open(tmp_path, "replica-0")
    assert (again.seq, again.head, again.ok) == (3, third.hash, True)
    assert again.append("anchor", {"n": 4}).prev == third.hash
    again.close()


def test_a_torn_last_line_is_dropped_and_the_rest_kept(tmp_path: Path, ledger: Ledger) -> None:
    ledger.append("anchor", {"n": 1})
    kept = ledger.path.stat().st_size
    ledger.close()
    with ledger.path.open("ab") as segment:
        segment.write(b'{"seq":2,"time":1.0,"kind":"anch')  # a crash before the newline
    again = Ledger.open(tmp_path, "replica-0")
    assert again.ok and again.seq == 1
    assert again.path.stat().st_size == kept
    again.close()


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda r: r.update(payload={"n": 99}), "hash does not match"),
        (lambda r: r.update(seq=5), "a gap or reorder"),
        (lambda r: r.update(prev="1" * 64), "prev does not match"),
    ],
)
def test_a_corrupt_segment_is_reported_and_refuses_appends(
    tmp_path: Path, ledger: Ledger, edit: object, problem: str
) -> None:
    for n in range(3):
        ledger.append("anchor", {"n": n})
    ledger.close()
    lines = ledger.path.read_bytes().splitlines()
    record = json.loads(lines[1])
    edit(record)  # type: ignore[operator]
    lines[1] = json.dumps(record).encode()
    ledger.path.write_bytes(b"\n".join(lines) + b"\n")
    again = Ledger.open(tmp_path, "replica-0")
    assert not again.ok and "record 2" in str(again.problem) and problem in str(again.problem)
    with pytest.raises(LedgerUnavailable, match="refuses records"):
        again.append("anchor", {"n": 3})
    assert ledger.path.read_bytes() == b"\n".join(lines) + b"\n"  # nothing written
    again.close()


def test_a_second_process_on_the_same_replica_id_gets_its_own_segment(
    tmp_path: Path, ledger: Ledger
) -> None:
    other = Ledger.open(tmp_path, "replica-0")  # another open file: the flock is taken
    assert other.replica_id == "replica-0-2" and other.path != ledger.path
    other.close()
    ledger.close()
    assert Ledger.open(tmp_path, "replica-0").replica_id == "replica-0"


@pytest.fixture
def file_size_limit() -> Iterator[None]:
    """RLIMIT_FSIZE is restored after the test; SIGXFSZ is ignored (as CPython sets it)."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_write_is_undone_refused_and_the_ledger_recovers(
    tmp_path: Path, ledger: Ledger, file_size_limit: None
) -> None:
    ledger.append("anchor", {"n": 1})
    size = ledger.path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, hard))  # room for part of a record
    with pytest.raises(LedgerUnavailable, match="cannot write: OSError: File too large"):
        ledger.append("anchor", {"n": 2, "padding": "x" * 100})
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert ledger.path.stat().st_size == size and ledger.ok and ledger.seq == 1
    ledger.append("anchor", {"n": 3})
    read = read_segment(ledger.path)
    assert read.problem is None and [r.payload["n"] for r in read.records] == [1, 3]


def test_anchors_are_recorded_signed_idempotent_and_only_move_forward(
    tmp_path: Path, ledger: Ledger
) -> None:
    book = AnchorBook.open(ledger, PROVIDER)
    receipt = book.anchor(CHAIN, 3, HEADS[3], 3, "splitvault-public")
    assert (receipt.replica_id, receipt.anchored_by, receipt.signer) == (
        "replica-0",
        "splitvault-public",
        book.key_id,
    )
    seq = ledger.seq
    assert book.anchor(CHAIN, 3, HEADS[3], 3, "splitvault-public") == receipt  # a retry
    assert ledger.seq == seq  # recorded once
    with pytest.raises(AnchorConflict, match="anchored with another head"):
        book.anchor(CHAIN, 3, HEADS[4], 3, "splitvault-public")
    with pytest.raises(AnchorConflict, match="anchors move forward only"):
        book.anchor(CHAIN, 2, HEADS[2], 2, "splitvault-public")
    with pytest.raises(InvalidInput, match="record_count must equal seq"):
        book.anchor(CHAIN, 5, HEADS[5], 4, "splitvault-public")
    with pytest.raises(InvalidInput, match="head must be 64"):
        book.anchor(CHAIN, 5, "F" * 64, 5, "splitvault-public")
    book.anchor("d" * 32, 1, HEADS[1], 1, "splitvault-public")  # another chain: its own order
    assert ledger.seq == seq + 1
    ledger.close()
    # After a restart the ledger still knows: the conflict is refused, the key is the same.
    reopened = AnchorBook.open(Ledger.open(tmp_path, "replica-0"), PROVIDER)
    assert reopened.key_id == book.key_id
    with pytest.raises(AnchorConflict):
        reopened.anchor(CHAIN, 3, HEADS[5], 3, "splitvault-public")


def test_the_export_carries_the_keys_that_verify_every_anchor(
    tmp_path: Path, ledger: Ledger
) -> None:
    book = AnchorBook.open(ledger, PROVIDER)
    for seq in (2, 4, 6):
        book.anchor(CHAIN, seq, HEADS[seq], seq, "splitvault-public")
    out = tmp_path / "anchors.json"
    export_anchors([tmp_path]).write(out)
    (replica,) = AnchorsFile.read(out).replicas
    assert replica.replica_id == "replica-0" and list(replica.keys) == [book.key_id]
    assert [a.seq for a in replica.anchors] == [2, 4, 6]
    key = replica.public_key(book.key_id)
    assert key is not None and all(a.verifies_with(key) for a in replica.anchors)
    forged = replica.anchors[0].__class__(**{**replica.anchors[0].to_json(), "head": HEADS[0]})
    assert not forged.verifies_with(key)


def test_the_signing_key_is_stored_encrypted_under_the_kek(tmp_path: Path, ledger: Ledger) -> None:
    book = AnchorBook.open(ledger, PROVIDER)
    path = signing_key_path(ledger)
    data = path.read_bytes()
    assert data.startswith(MAGIC) and b"PRIVATE KEY" not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ledger.close()
    reopened = Ledger.open(tmp_path, "replica-0")
    try:
        with pytest.raises(DecryptionError):  # the state volume alone signs nothing
            AnchorBook.open(reopened, LocalFileKeyProvider.from_bytes(b"x" * 32))
        assert AnchorBook.open(reopened, PROVIDER).key_id == book.key_id
    finally:
        reopened.close()


def test_a_plain_pem_key_of_an_older_release_is_encrypted_in_place(
    tmp_path: Path, ledger: Ledger
) -> None:
    old = Ed25519PrivateKey.generate()
    path = signing_key_path(ledger)
    path.write_bytes(
        old.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    book = AnchorBook.open(ledger, PROVIDER)
    reference = AnchorBook(ledger, old)
    assert book.key_id == reference.key_id
    assert path.read_bytes().startswith(MAGIC)


def test_a_ledger_that_breaks_while_serving_is_reported_not_serving(ledger: Ledger) -> None:
    import asyncio
    import os

    from grpc_health.v1 import health_pb2
    from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

    from private_core.ledger_service import LEDGER_SERVICE, LedgerService

    async def scenario() -> list[int]:
        service = LedgerService(ledger, AnchorBook.open(ledger, PROVIDER))
        health = health_aio.HealthServicer()
        request = health_pb2.HealthCheckRequest(service=LEDGER_SERVICE)
        await health.set(LEDGER_SERVICE, service.health_status)  # as the tier does at start
        watch = asyncio.create_task(service.keep_health(health, interval_s=0.01))
        seen = [(await health.Check(request, None)).status]
        os.close(ledger._fd)  # the volume goes away: the write and its undo both fail
        with pytest.raises(LedgerUnavailable):
            ledger.append("anchor", {"n": 1})
        assert not ledger.ok
        for _ in range(500):  # until the watcher has seen it (no wall-clock assertion)
            status = (await health.Check(request, None)).status
            if status != seen[-1]:
                seen.append(status)
                break
            await asyncio.sleep(0.01)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        ledger._fd = -1  # already closed above
        return seen

    assert asyncio.run(scenario()) == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]
