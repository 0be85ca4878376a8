"""Replay of the red team's audit rewrite (issue 12, finding 4) against the private ledger.

Both tiers run as real processes with real mutual TLS on a digits-only deployment. The public
tier anchors its audit trail in the private tier's ledger; a copy of the trail rewritten with
sqlite3 (records moved to another key, the tail deleted, the chain recomputed with the trail's
own hash function, the receipts deleted) still passes the plain chain check, and fails
``audit verify --anchors`` with the ledger's export. A conflicting anchor is refused. A ledger
that cannot write, and a private tier that is down, leave records unanchored: served up to the
bound, then 503, then served and anchored again once the ledger records.
"""

from __future__ import annotations

import json
import resource
import sqlite3
import ssl
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from protos import inference_pb2, inference_pb2_grpc
from public_api.audit import AUDIT_DB
from public_api.keys import STATE_DIR, parse_key_id
from shared.anchor_receipt import AnchorReceipt
from shared.anchors_file import AnchorsFile
from shared.keys import LocalFileKeyProvider
from shared.layout import PUBLIC_REPLICA_PREFIX, DeployLayout
from shared.manifest import TopKPolicy
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.packing.pack import pack_spec
from tests.conftest import DigitsFixture, issue_key
from tests.support.audit_rewrite import rewrite_trail
from tests.support.deployments import copy_deployment
from tests.support.ports import ReservedPort
from tests.support.processes import TierProcess, start_public, start_tier
from tests.support.stack import cli, image_request, poll, tier_env

pytestmark = pytest.mark.slow

REPLICA = "private-0"
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture) -> DeployLayout:
    """A deployment with the digits model only (no MiniLM to pack)."""
    layout = init_deployment(tmp_path_factory.mktemp("anchoring") / "d")
    pack_spec(
        digits_model.spec,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        name="digits",
        split=digits.SPLIT,
        policy=TopKPolicy(k=3),
        show_progress=False,
    )
    return layout


@dataclass
class Stack:
    """A deployment copy, its private tier on a reserved port, its public tier and keys."""

    layout: DeployLayout
    private: TierProcess
    public: TierProcess
    port: ReservedPort
    keys: dict[str, str]
    images: np.ndarray

    def http(self, key: str) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.layout.public.ca_cert))
        return httpx.Client(
            base_url=f"https://localhost:{self.public.port}",
            verify=context,
            headers={"Authorization": f"Bearer {self.keys[key]}"},
            timeout=30.0,
        )

    def infer(self, key: str, n: int = 1) -> httpx.Response:
        with self.http(key) as http:
            return http.post(INFER, json=image_request(self.images[:n]))

    def restart_private(self) -> None:
        self.private.stop()
        self.private = _start_private(self.layout, self.port)

    def anchored(self, seq: int) -> None:
        """Wait for the public tier's ``audit_anchored`` event of record ``seq``."""
        poll(
            lambda: any(e.get("seq") == seq for e in self.anchor_events()),
            f"an anchor of record {seq}",
        )

    def anchor_events(self) -> list[dict[str, Any]]:
        return [e for e in self.public.events() if e.get("event") == "audit_anchored"]

    @property
    def trail(self) -> Path:
        return self.layout.public.root / STATE_DIR / AUDIT_DB

    def records(self) -> int:
        with closing(sqlite3.connect(self.trail)) as db:
            return int(db.execute("SELECT count(*) FROM audit").fetchone()[0])


def _stack(packed: DeployLayout, root: Path, digits_model: DigitsFixture, **anchor: Any) -> Stack:
    layout = copy_deployment(packed, root, skip_models=(), keep_public_state=False)
    keys = {name: issue_key(layout, name) for name in ("alice", "bob")}
    env = tier_env(**{f"audit_anchor__{name}": value for name, value in anchor.items()})
    port = ReservedPort()
    try:
        private = _start_private(layout, port)
    except BaseException:
        port.close()
        raise
    try:
        public = start_public(layout.root, port.port, env=env)
    except BaseException:
        private.stop()
        port.close()
        raise
    return Stack(layout, private, public, port, keys, digits_model.data.test_x)


def _start_private(layout: DeployLayout, port: ReservedPort) -> TierProcess:
    """The private tier on the reserved port, with a fixed replica id (its ledger segment)."""
    return start_tier(
        ["serve", "private", "--deploy", str(layout.root), "--port", str(port.port)],
        "private_tier_listening",
        env={
            **tier_env(),
            "SPLITVAULT_PRIVATE_METRICS_PORT": "0",
            "SPLITVAULT_PRIVATE_REPLICA_ID": REPLICA,
        },
    )


def _stop(stack: Stack) -> None:
    print("\n".join(stack.public.lines[-80:]))  # shown by pytest only when a test failed
    print("\n".join(stack.private.lines[-40:]))
    stack.public.stop()
    stack.private.stop()
    stack.port.close()


@pytest.fixture(scope="module")
def served(
    packed: DeployLayout, tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture
) -> Iterator[Stack]:
    """Tiers anchoring every 4 records or 0.5 s, after 20 answers to two keys, all anchored."""
    stack = _stack(
        packed, tmp_path_factory.mktemp("served") / "d", digits_model, every_records=4, every_s=0.5
    )
    try:
        for i in range(20):
            assert stack.infer("alice" if i % 3 else "bob").status_code == 200
        stack.anchored(20)
        yield stack
    finally:
        _stop(stack)


def _export(stack: Stack, out: Path) -> AnchorsFile:
    """``splitvault ledger export-anchors`` on the private host's deployment folder."""
    exported = cli("ledger", "export-anchors", "--out", str(out), deploy=stack.layout.root)
    assert exported.returncode == 0, exported.stderr
    return AnchorsFile.read(out)


def _suspect_copy(stack: Stack, folder: Path) -> Path:
    """A consistent copy of the live audit trail in a deployment-shaped folder of its own."""
    target = folder / "public" / STATE_DIR / AUDIT_DB
    target.parent.mkdir(parents=True)
    with closing(sqlite3.connect(stack.trail)) as source, closing(sqlite3.connect(target)) as copy:
        source.backup(copy)
    return target


def _verify(folder: Path, *extra: str) -> tuple[int, str]:
    result = cli("audit", "verify", *extra, deploy=folder)
    return result.returncode, result.stdout + result.stderr


def test_a_rewritten_trail_fails_verification_against_the_ledger(
    served: Stack, tmp_path: Path
) -> None:
    anchors = tmp_path / "anchors.json"
    exported = _export(served, anchors)
    (replica,) = exported.replicas
    assert replica.replica_id == REPLICA and max(a.seq for a in replica.anchors) == 20
    # Untouched, the copy is covered up to the last anchor.
    untouched = tmp_path / "untouched"
    _suspect_copy(served, untouched)
    code, out = _verify(untouched, "--anchors", str(anchors))
    assert code == 0, out
    assert "records 1..20 covered by an anchor of the private ledger (verified)" in out
    # The red team's rewrite: alice's first records moved to bob, the last 5 deleted, the chain
    # recomputed, the receipts on the public host deleted.
    rewritten = tmp_path / "rewritten"
    copy = _suspect_copy(served, rewritten)
    bob = parse_key_id(served.keys["bob"])
    left = rewrite_trail(
        copy,
        [
            f"UPDATE audit SET key_id = '{bob}' WHERE seq <= 7",  # noqa: S608
            "DELETE FROM audit WHERE seq > 15",
            "DELETE FROM audit_anchors",
        ],
    )
    assert left == 15
    code, out = _verify(rewritten)
    assert code == 0 and "OK: 15 records, chain intact" in out  # the finding, without anchors
    assert "NOT covered by a verified anchor" in out
    code, out = _verify(rewritten, "--anchors", str(anchors))
    assert code == 1, out
    assert "FAILED verification: record " in out and "does not match the head" in out
    assert "record 20 was anchored by replica private-0 but is not in the trail" in out


def test_deleting_anchored_tail_records_fails_and_receipts_match_the_ledger(
    served: Stack, tmp_path: Path
) -> None:
    anchors = tmp_path / "anchors.json"
    (replica,) = _export(served, anchors).replicas
    copy = _suspect_copy(served, tmp_path / "truncated")
    with closing(sqlite3.connect(copy)) as db:
        receipts = {
            AnchorReceipt.from_json(json.loads(text))
            for (text,) in db.execute("SELECT receipt FROM audit_anchors")
        }
    assert receipts and receipts <= set(replica.anchors)  # signed receipts beside the records
    rewrite_trail(copy, ["DELETE FROM audit WHERE seq > 18"])
    code, out = _verify(tmp_path / "truncated", "--anchors", str(anchors))
    assert code == 1 and "record 20 was anchored" in out, out


def _ledger_stub(stack: Stack) -> tuple[grpc.Channel, inference_pb2_grpc.PrivateLedgerStub]:
    """A channel with the public tier's certificate: what someone who owns the public host has."""
    tls = stack.layout.public.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.crt").read_bytes(),
        private_key=(tls / "client.key").read_bytes(),
        certificate_chain=(tls / "client.crt").read_bytes(),
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{stack.port.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "splitvault-private")],
    )
    return channel, inference_pb2_grpc.PrivateLedgerStub(channel)


def test_a_conflicting_anchor_from_the_public_identity_is_refused(served: Stack) -> None:
    with closing(sqlite3.connect(served.trail)) as db:
        chain = db.execute("SELECT value FROM audit_meta WHERE name = 'chain_id'").fetchone()[0]
        head = db.execute("SELECT hash FROM audit WHERE seq = 20").fetchone()[0]
        anchored = {seq for (seq,) in db.execute("SELECT seq FROM audit_anchors")}
    between = min(set(range(1, 20)) - anchored)  # a record no anchor ends at
    channel, stub = _ledger_stub(served)
    with channel:
        again = stub.AnchorAudit(
            inference_pb2.AnchorRequest(chain_id=chain, seq=20, head=head, record_count=20)
        )
        assert again.head == head and again.replica_id == REPLICA  # a retry: the same receipt
        forged = "f" * 64
        with pytest.raises(grpc.RpcError) as conflict:
            stub.AnchorAudit(
                inference_pb2.AnchorRequest(chain_id=chain, seq=20, head=forged, record_count=20)
            )
        assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as backwards:
            stub.AnchorAudit(
                inference_pb2.AnchorRequest(
                    chain_id=chain, seq=between, head=forged, record_count=between
                )
            )
        assert backwards.value.code() == grpc.StatusCode.ALREADY_EXISTS
    (event,) = served.private.wait_for_events("audit_anchor_conflict")  # only the one
    assert (event["seq"], event["anchored_head"], event["offered_head"]) == (20, head, forged)
    assert event["identity"] == PUBLIC_REPLICA_PREFIX + "1"  # the first public replica's CN
    served.private.wait_for_events("audit_anchor_out_of_order")


def test_evidence_states_which_records_an_anchor_covers(served: Stack, tmp_path: Path) -> None:
    anchors = tmp_path / "anchors.json"
    _export(served, anchors)
    alice = str(parse_key_id(served.keys["alice"]))
    argv = ["evidence", "--key", alice, "--model", "digits", "--out", str(tmp_path / "report")]
    result = cli(*argv, "--anchors", str(anchors), deploy=served.layout.root)
    assert result.returncode == 0, result.stdout + result.stderr
    audit = json.loads((tmp_path / "report" / "evidence.json").read_text())["audit"]
    assert audit["status"] == "OK"
    assert audit["anchoring"]["verified_against_ledger"]
    assert audit["anchoring"]["covered_through"] == served.records() == 20
    assert audit["records"] and all(record["anchored"] for record in audit["records"])
    assert any("records 1..20 covered" in line for line in audit["anchoring"]["statement"])
    page = (tmp_path / "report" / "evidence.html").read_text()
    assert "Anchoring in the private ledger" in page


@pytest.fixture
def outage(packed: DeployLayout, tmp_path: Path, digits_model: DigitsFixture) -> Iterator[Stack]:
    """Tiers anchoring every 2 records; at most 6 may wait unanchored."""
    stack = _stack(
        packed,
        tmp_path / "d",
        digits_model,
        every_records=2,
        every_s=0.3,
        max_unanchored_records=6,
        max_unanchored_s=3600,
        retry_s=0.2,
    )
    try:
        yield stack
    finally:
        _stop(stack)


def _segment(stack: Stack) -> Path:
    return stack.layout.private.root / "state" / "ledger" / f"{REPLICA}.svlg"


def test_unanchorable_records_are_buffered_then_refused_then_recover(outage: Stack) -> None:
    for _ in range(2):
        assert outage.infer("alice").status_code == 200
    outage.anchored(2)
    # The ledger's volume refuses to grow (as when full): anchors cannot be recorded.
    pid = outage.private.process.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (_segment(outage).stat().st_size, hard))
    statuses = [outage.infer("alice") for _ in range(8)]
    assert [r.status_code for r in statuses] == [200] * 6 + [503] * 2  # the buffer, then refusal
    refused = statuses[-1]
    assert int(refused.headers["retry-after"]) >= 1
    assert "audit trail cannot be anchored" in refused.json()["error"]
    outage.private.wait_for_events("ledger_write_failed")
    outage.public.wait_for_events("audit_anchor_failed")
    outage.public.wait_for_events("audit_anchoring_refusing")
    assert "splitvault_audit_anchor_refusing 1.0" in httpx.get(outage.public.metrics_url).text
    # The volume recovers: the waiting records are anchored and requests served again.
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    poll(lambda: outage.infer("alice").status_code == 200, "service after the ledger recovers")
    outage.public.wait_for_events("audit_anchoring_recovered")
    # The private tier down: nothing answers, records wait; it comes back and anchors them.
    outage.private.stop()
    assert outage.infer("alice").status_code == 503
    outage.restart_private()
    poll(lambda: outage.infer("alice").status_code == 200, "service after the restart")
    poll(
        lambda: (
            "splitvault_audit_unanchored_records 0.0" in httpx.get(outage.public.metrics_url).text
        ),
        "every record anchored after the restart",
    )
    total = outage.records()
    assert total == max(e["seq"] for e in outage.anchor_events())
    anchors = outage.layout.root / "anchors.json"
    _export(outage, anchors)
    code, out = _verify(outage.layout.root, "--anchors", str(anchors))
    assert code == 0 and f"records 1..{total} covered" in out, out


def test_the_private_ledger_never_lives_on_the_public_side(served: Stack) -> None:
    public = list(served.layout.public.root.rglob("*"))
    assert not any(p.suffix == ".svlg" or p.name == "ledger" for p in public)
    segment = _segment(served)
    assert segment.is_file() and segment.stat().st_mode & 0o077 == 0
    assert segment.with_suffix(".key").stat().st_mode & 0o077 == 0
