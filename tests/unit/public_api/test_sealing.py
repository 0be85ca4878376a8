"""Sealed request bodies: HPKE to the owner's key, retention per key, a writer that refuses."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from public_api.sealed_store import (
    Retention,
    SealedRecord,
    SealedStore,
    delete_key,
    read_sealed,
    summary,
)
from public_api.sealing import (
    GRPC_MODEL_INFER,
    V2_JSON,
    RequestSealer,
    binary_header_length,
    content_digest,
    open_sealed,
    rest_content_type,
    seal,
)
from shared.errors import Unavailable

OWNER = X25519PrivateKey.generate()


def _sealed(i: int, key_id: str, size: int = 10, time_s: float = 1000.0) -> SealedRecord:
    body = str(i).encode().ljust(size, b" ")
    return seal(
        body, OWNER.public_key(), time_s=time_s + i, key_id=key_id, model="m", request_id=""
    )


def test_a_body_opens_only_with_the_owner_key_and_its_own_metadata() -> None:
    record = seal(
        b'{"inputs": []}', OWNER.public_key(), time_s=5.0, key_id="k_a", model="m", request_id="r"
    )
    assert open_sealed(record, OWNER) == b'{"inputs": []}'
    assert record.body_sha256 == hashlib.sha256(b'{"inputs": []}').hexdigest()
    assert b"inputs" not in record.sealed
    for changed in ({"time": 6.0}, {"model": "n"}, {"request_id": "s"}):
        with pytest.raises(ValueError, match="does not open"):
            open_sealed(type(record)(**{**record.__dict__, **changed}), OWNER)
    with pytest.raises(ValueError, match="does not open"):
        open_sealed(record, X25519PrivateKey.generate())


def test_content_digest_is_rfc_9530_sha_256() -> None:
    # RFC 9530 appendix B.1: {"hello": "world"}\n
    digest = hashlib.sha256(b'{"hello": "world"}\n').hexdigest()
    assert content_digest(digest) == "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:"


def test_one_keys_traffic_never_evicts_anothers_bodies(tmp_path: Path) -> None:
    path = tmp_path / "sealed.sqlite3"
    store = SealedStore(path, Retention(max_records=10, max_bytes=1 << 20, max_age_s=1e9))
    store.insert([_sealed(i, "k_victim") for i in range(3)], now=1000.0)
    for start in range(0, 200, 20):
        store.insert([_sealed(i, "k_flood") for i in range(start, start + 20)], now=1000.0)
    store.close()
    assert [r.time for r in read_sealed(path, "k_victim")] == [1000.0, 1001.0, 1002.0]
    flood = list(read_sealed(path, "k_flood"))
    assert [r.time for r in flood] == [1000.0 + i for i in range(190, 200)]  # its newest 10
    assert {row[0]: row[1] for row in summary(path)} == {"k_flood": 10, "k_victim": 3}
    assert delete_key(path, "k_flood") == 10
    assert [row[0] for row in summary(path)] == ["k_victim"]


def test_bytes_and_age_bound_a_key_too(tmp_path: Path) -> None:
    path = tmp_path / "sealed.sqlite3"
    store = SealedStore(path, Retention(max_records=1000, max_bytes=250, max_age_s=50.0))
    store.insert([_sealed(i, "k_a", size=100) for i in range(5)], now=1004.0)
    assert len(list(read_sealed(path, "k_a"))) == 2  # 2 x 100 bytes within 250
    store.insert([_sealed(0, "k_b")], now=1004.0)
    store.insert([_sealed(60, "k_b")], now=1060.0)  # the first of k_b is now too old
    store.close()
    assert [r.time for r in read_sealed(path, "k_b")] == [1060.0]


def test_the_sealer_refuses_when_it_cannot_keep_up_or_write(tmp_path: Path) -> None:
    path = tmp_path / "sealed.sqlite3"
    store = SealedStore(path, Retention(10, 1 << 20, 1e9))
    sealer = RequestSealer(store, OWNER.public_key(), max_pending=100, retry_interval_s=0.05)
    sealer.submit("k_a", "m", "r-1", b"{}")
    sealer.flush()
    assert [open_sealed(r, OWNER) for r in read_sealed(path)] == [b"{}"]
    store._db.execute("PRAGMA query_only=ON")  # storage refuses writes from now on
    sealer.submit("k_a", "m", "r-2", b"{}")
    with pytest.raises(Unavailable, match="cannot be written"):
        sealer.flush()
    with pytest.raises(Unavailable, match="cannot be sealed"):
        sealer.check_accepting()
    store._db.execute("PRAGMA query_only=OFF")  # storage recovers: nothing accepted is lost
    deadline = time.monotonic() + 20
    while sealer._failure is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer retries every retry_interval_s
    sealer.close()
    assert [r.request_id for r in read_sealed(path)] == ["r-1", "r-2"]


def test_content_type_and_signature_nonce_are_bound_to_the_body() -> None:
    record = seal(b"\x0a\x01m", OWNER.public_key(), time_s=5.0, key_id="k_a", model="m",
                  request_id="r", content_type=GRPC_MODEL_INFER, nonce="n-1")  # fmt: skip
    assert open_sealed(record, OWNER) == b"\x0a\x01m"
    for changed in ({"content_type": V2_JSON}, {"signature_nonce": "n-2"}):
        with pytest.raises(ValueError, match="does not open"):
            open_sealed(type(record)(**{**record.__dict__, **changed}), OWNER)


def test_the_content_type_of_a_binary_body_names_its_json_header() -> None:
    assert rest_content_type(None) == V2_JSON
    assert binary_header_length(rest_content_type("120")) == 120
    assert binary_header_length(V2_JSON) is None
    assert binary_header_length(GRPC_MODEL_INFER) is None


_V1_SCHEMA = """CREATE TABLE sealed (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL,
key_id TEXT NOT NULL, model TEXT NOT NULL, request_id TEXT NOT NULL, body_sha256 TEXT NOT NULL,
size INTEGER NOT NULL, owner_key_id TEXT NOT NULL, sealed BLOB NOT NULL)"""


def test_a_store_from_before_content_types_is_read_then_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "sealed.sqlite3"
    old = seal(
        b"{}",
        OWNER.public_key(),
        time_s=1.0,
        key_id="k_a",
        model="m",
        request_id="r",
        content_type="",
    )  # content_type "": sealed as before content types
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(_V1_SCHEMA)
        db.execute("INSERT INTO sealed (time, key_id, model, request_id, body_sha256, size, "
                   "owner_key_id, sealed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (old.time, old.key_id, old.model, old.request_id, old.body_sha256, old.size,
                    old.owner_key_id, old.sealed))  # fmt: skip
    (legacy,) = read_sealed(path)  # read-only, unchanged
    assert (legacy.content_type, legacy.signature_nonce) == ("", "")
    assert open_sealed(legacy, OWNER) == b"{}"
    store = SealedStore(path, Retention(10, 1 << 20, 1e9))
    store.insert([_sealed(1, "k_a")], now=1000.0)
    store.close()
    first, second = read_sealed(path)
    assert open_sealed(first, OWNER) == b"{}" and second.content_type == V2_JSON
