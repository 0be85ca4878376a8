"""Sealed request bodies: each served request's exact body, encrypted to the owner's key.

Proof of extraction needs the queries a copy was trained on. Rather than keep them readable
on the internet-facing host, the public tier seals each served request's body to the owner's
X25519 public key (``public/owner.pub``) with RFC 9180 HPKE, base mode,
DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305, as ``cryptography`` implements
it: a fresh ephemeral key per body, so neither tier can read a body back; only the owner's
private key, kept off both tiers (``splitvault owner keygen``), opens them offline. The HPKE
``info`` binds the row's time, key, model, request id, body SHA-256, content type and
signature nonce, so a row whose metadata was altered, or a body moved to another row, does not
open. The body's SHA-256 (and its RFC 9530 ``Content-Digest`` form, for matching a client's
request signature) is kept in clear, so a signed digest can be compared without opening
anything; the signature's nonce links the body to the private tier's record of that signature.

Bodies of every ingress are sealed, each tagged with how to read it: ``V2_JSON`` (REST v2
JSON), ``v2_binary_type(n)`` (REST v2 with binary tensors after an n-byte JSON header),
``GRPC_MODEL_INFER`` (a v2 gRPC ``ModelInferRequest``, serialized again from the message
received: the same message, not necessarily the same bytes) and ``EMBEDDINGS_JSON``.

Off the request path, as the audit trail: ``submit`` queues the body (its bytes are already in
memory); a writer thread seals and inserts in batches and enforces retention per key. When
``max_pending`` bodies wait, or the last write failed, ``submit`` raises ``Unavailable`` and
the answer is not sent (503).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protos import inference_pb2
from public_api.sealed_store import SEALED_DB, Retention, SealedRecord, SealedStore
from public_api.sealing_settings import SealingSettings
from shared.errors import Unavailable
from shared.logs import get_logger
from shared.signatures import SignedRequest, signature_params

OWNER_PUBLIC_KEY = "owner.pub"  # in the public tier's folder
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
_INFO_LABEL = "splitvault-sealed-request/v1"
_INFO_LABEL_V2 = "splitvault-sealed-request/v2"  # rows with a content type
V2_JSON = "application/json"
V2_BINARY = "application/octet-stream"
GRPC_MODEL_INFER = "application/grpc+proto; message=inference.ModelInferRequest"
EMBEDDINGS_JSON = "application/json; api=embeddings"
_HEADER_LENGTH_PARAM = "; inference-header-content-length="
log = get_logger(__name__)


def owner_key_id(public_key: X25519PublicKey) -> str:
    """16 hex characters naming an owner public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(b"splitvault-owner-key\0" + raw).hexdigest()[:16]


def load_public_key(path: Path) -> X25519PublicKey:
    """An owner public key (PEM); ``ValueError`` if the file holds anything else."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, X25519PublicKey):
        raise ValueError(f"{path} is not an X25519 public key")
    return key


def content_digest(body_sha256: str) -> str:
    """The RFC 9530 ``Content-Digest`` value of a body with this SHA-256 (hex)."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(body_sha256)).decode("ascii") + ":"


def v2_binary_type(header_length: int) -> str:
    """The content type of a REST v2 body whose first ``header_length`` bytes are its JSON."""
    return f"{V2_BINARY}{_HEADER_LENGTH_PARAM}{header_length}"


def rest_content_type(header_length: str | None) -> str:
    """The content type of a REST v2 body (``header_length``: its
    ``Inference-Header-Content-Length``, already checked to be a byte count, or None)."""
    return V2_JSON if header_length is None else v2_binary_type(int(header_length))


def binary_header_length(content_type: str) -> int | None:
    """The JSON header length of a ``v2_binary_type``; None for any other content type."""
    prefix = V2_BINARY + _HEADER_LENGTH_PARAM
    if not content_type.startswith(prefix) or not content_type[len(prefix) :].isdigit():
        return None
    return int(content_type[len(prefix) :])


def seal_info(record: SealedRecord) -> bytes:
    """HPKE ``info``: the row's metadata, so that a body opens only under its own row (rows
    written before content types keep their first form)."""
    fields: dict[str, object] = {
        "time": record.time,
        "key_id": record.key_id,
        "model": record.model,
        "request_id": record.request_id,
        "body_sha256": record.body_sha256,
    }
    if not record.content_type:
        return (_INFO_LABEL + "\0" + json.dumps(fields, sort_keys=True)).encode()
    fields |= {"content_type": record.content_type, "signature_nonce": record.signature_nonce}
    return (_INFO_LABEL_V2 + "\0" + json.dumps(fields, sort_keys=True)).encode()


def signature_nonce(signature: inference_pb2.RequestSignature | None) -> str:
    """The nonce of a forwarded request signature ("" for an unsigned request)."""
    if signature is None:
        return ""
    signed = SignedRequest(
        signature.method,
        signature.content_digest,
        signature.claims,
        signature.signature_input,
        signature.signature,
    )
    return signature_params(signed).nonce


def seal(
    body: bytes,
    public_key: X25519PublicKey,
    *,
    time_s: float,
    key_id: str,
    model: str,
    request_id: str,
    content_type: str = V2_JSON,
    nonce: str = "",
) -> SealedRecord:
    """``body`` sealed to ``public_key``, with its metadata."""
    record = SealedRecord(
        time=time_s,
        key_id=key_id,
        model=model,
        request_id=request_id,
        body_sha256=hashlib.sha256(body).hexdigest(),
        size=len(body),
        owner_key_id=owner_key_id(public_key),
        sealed=b"",
        content_type=content_type,
        signature_nonce=nonce,
    )
    return replace(record, sealed=SUITE.encrypt(body, public_key, info=seal_info(record)))


def open_sealed(record: SealedRecord, private_key: X25519PrivateKey) -> bytes:
    """The body of ``record``; ``ValueError`` if it does not open or its digest differs."""
    try:
        body = SUITE.decrypt(record.sealed, private_key, info=seal_info(record))
    except Exception:  # InvalidTag and kin: wrong key, altered row or ciphertext
        raise ValueError(
            "a sealed body does not open: another owner key, or the row was altered"
        ) from None
    if hashlib.sha256(body).hexdigest() != record.body_sha256:
        raise ValueError("a sealed body does not match its recorded SHA-256")
    return body


@dataclass(frozen=True)
class _Pending:
    time: float
    key_id: str
    model: str
    request_id: str
    body: bytes
    content_type: str
    nonce: str


class RequestSealer:
    """Queues served bodies; one writer thread seals, inserts and bounds them."""

    def __init__(
        self,
        store: SealedStore,
        public_key: X25519PublicKey,
        *,
        max_pending: int,
        flush_interval_s: float = 0.05,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.store, self.public_key = store, public_key
        self.key_id = owner_key_id(public_key)
        self._max_pending = max_pending
        self._flush_interval_s, self._retry_interval_s = flush_interval_s, retry_interval_s
        self._queue: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._progress = threading.Condition()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._submitted = self._written = 0
        self._failure: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="request-sealer", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, state_dir: Path, tier_dir: Path, settings: SealingSettings) -> RequestSealer:
        """The sealer of a tier whose folder holds the owner's public key."""
        retention = Retention(
            settings.max_records_per_key,
            settings.max_bytes_per_key,
            settings.retention_days * 86400,
        )
        public_key = load_public_key(tier_dir / OWNER_PUBLIC_KEY)
        store = SealedStore(state_dir / SEALED_DB, retention)
        return cls(store, public_key, max_pending=settings.max_pending)

    def check_accepting(self) -> None:
        """``Unavailable`` if ``submit`` would refuse now (so refuse before any work)."""
        with self._lock:
            refusal = self._refusal()
        if refusal is not None:
            raise refusal

    def submit(
        self,
        key_id: str | None,
        model: str,
        request_id: str | None,
        body: bytes,
        content_type: str = V2_JSON,
        nonce: str = "",
    ) -> None:
        """Queue one served request's exact body (encoded as ``content_type``; ``nonce``: its
        request signature's); ``Unavailable`` if it cannot be kept."""
        pending = _Pending(
            time.time(), key_id or "", model, request_id or "", body, content_type, nonce
        )
        with self._lock:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            self._queue.append(pending)
            self._submitted += 1

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every body submitted so far is written."""
        target, deadline = self._submitted, time.monotonic() + timeout
        self._wake.set()
        with self._progress:
            while self._written < target:
                if self._failure is not None:
                    raise Unavailable(f"sealed bodies cannot be written: {self._failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{target - self._written} sealed bodies unwritten")
                self._progress.wait(remaining)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer, close the store."""
        with self._lock:
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._queue:
            log.error("sealed_bodies_unwritten", count=len(self._queue), reason=self._failure)
        self.store.close()

    def _refusal(self) -> Unavailable | None:
        if self._closed:
            return Unavailable("request sealing is closed")
        if self._failure is not None:
            return Unavailable(
                f"request bodies cannot be sealed: {self._failure}", retry_after_s=1.0
            )
        if len(self._queue) >= self._max_pending:
            return Unavailable("request sealing is not keeping up", retry_after_s=1.0)
        return None

    def _run(self) -> None:
        while True:
            with self._lock:
                batch = list(self._queue)[:256]
            if batch:
                if self._write(batch):
                    continue
                if self._stop.wait(self._retry_interval_s) and self._closed:
                    return
                continue
            if self._stop.is_set():
                return
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()

    def _write(self, batch: list[_Pending]) -> bool:
        try:
            records = [
                seal(
                    p.body,
                    self.public_key,
                    time_s=p.time,
                    key_id=p.key_id,
                    model=p.model,
                    request_id=p.request_id,
                    content_type=p.content_type,
                    nonce=p.nonce,
                )
                for p in batch
            ]
            deleted = self.store.insert(records)
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            if reason != self._failure:
                log.error("sealed_write_failed", reason=reason, pending=len(self._queue))
            with self._progress:
                self._failure = reason
                self._progress.notify_all()
            return False
        with self._lock:
            for _ in batch:
                self._queue.popleft()
        if deleted:
            log.info("sealed_retention", deleted=deleted)
        with self._progress:
            self._written += len(batch)
            self._failure = None
            self._progress.notify_all()
        return True


def build_sealer(
    state_dir: Path, tier_dir: Path, settings: SealingSettings
) -> RequestSealer | None:
    """The tier's sealer, or None (logged) when sealing is off or no owner key is installed."""
    if not settings.enabled:
        return None
    if not (tier_dir / OWNER_PUBLIC_KEY).is_file():
        log.warning(
            "sealing_off",
            reason=f"no owner public key at {tier_dir / OWNER_PUBLIC_KEY}: run splitvault owner keygen",
        )
        return None
    sealer = RequestSealer.open(state_dir, tier_dir, settings)
    log.info("sealing_on", owner_key_id=sealer.key_id, retention_days=settings.retention_days)
    return sealer


def terms_clause(settings: SealingSettings) -> str:
    """What the terms of service say about sealed bodies (appended to the operator's text)."""
    return (
        "\n\n## Retention of request bodies\n\n"
        "The exact body of every request we answer is kept, encrypted to a key that only the "
        "model's owner holds offline (neither server can read it back), with your API key, "
        "the time and the body's SHA-256. It is opened only to prove that a model was copied "
        f"from our answers. We keep at most {settings.max_records_per_key:,} bodies and "
        f"{settings.max_bytes_per_key:,} bytes per API key, none longer than "
        f"{settings.retention_days:g} days (the oldest are deleted first); ask us to delete "
        "your key's bodies at any time.\n"
    )
