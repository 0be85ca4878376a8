"""The owner's side of sealed request bodies: the key pair, and an API key's queries as
verification candidates, opened offline with the private key (``public_api.sealing``).

``splitvault owner keygen`` writes the private key to ``DEPLOY/owner/owner.key`` (0600; like
``DEPLOY/ca/``, never mounted into a tier: move it offline) and the public key to
``DEPLOY/public/owner.pub``, where the public tier finds it at start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from public_api.audit import input_digest
from public_api.sealed_store import SEALED_DB, SealedRecord, read_sealed
from public_api.sealing import (
    OWNER_PUBLIC_KEY,
    V2_JSON,
    content_digest,
    open_sealed,
    owner_key_id,
)
from public_api.settings import public_state_dir
from shared.layout import DeployLayout
from shared.state_files import private_dir
from shared.tensor_codec import numpy_dtype
from splitvault.ownership.bodies import decode_body
from splitvault.ownership.owner import Arrays, OwnerModel

OWNER_DIR, OWNER_KEY = "owner", "owner.key"


def generate_owner_key(deploy: Path, out: Path | None = None) -> tuple[Path, Path, str]:
    """Write a new owner key pair; returns (private key file, public key file, key id)."""
    layout = DeployLayout(deploy)
    if not layout.public.root.is_dir():
        raise FileNotFoundError(f"{layout.public.root} does not exist: not a deployment")
    private_path = out or deploy / OWNER_DIR / OWNER_KEY
    public_path = layout.public.root / OWNER_PUBLIC_KEY
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to replace an owner key")
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_dir(private_path.parent)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = key.public_key()
    public_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, owner_key_id(public)


def load_owner_key(path: Path) -> X25519PrivateKey:
    """The owner's private key (PEM, PKCS#8); ``ValueError`` if the file holds another kind."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"{path} is not an X25519 private key")
    return key


@dataclass(frozen=True)
class SealedQueries:
    """One API key's sealed queries of one model, opened: the inputs (rows of every body, in
    order) and, per body, its digest, encoding, signature nonce and rows."""

    inputs: Arrays
    requests: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unread: list[dict[str, Any]] = field(default_factory=list)  # rows that did not open/decode

    def rows_of(self, request: Mapping[str, Any]) -> Arrays:
        """The input rows of one of ``requests``."""
        first, count = int(request["first_row"]), int(request["rows"])
        return {name: array[first : first + count] for name, array in self.inputs.items()}

    @property
    def rows(self) -> int:
        """Candidate rows."""
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable: counts, dates and each body's attribution (no inputs)."""
        times = [r["time"] for r in self.requests]
        return {
            "bodies": len(self.requests),
            "rows": self.rows,
            "first": min(times) if times else None,
            "last": max(times) if times else None,
            "problems": self.problems,
            "requests": self.requests,
        }


def sealed_queries(
    deploy: Path, key_id: str, owner: OwnerModel, private_key: X25519PrivateKey
) -> SealedQueries:
    """Open ``key_id``'s sealed bodies for ``owner``'s model (others are skipped)."""
    path = public_state_dir(deploy) / SEALED_DB
    wanted = owner_key_id(private_key.public_key())
    pieces: list[Arrays] = []
    requests: list[dict[str, Any]] = []
    problems: list[str] = []
    unread: list[dict[str, Any]] = []
    rows = 0
    for record in read_sealed(path, key_id):
        if record.model != owner.name:
            continue
        about = _about(record)
        try:
            if record.owner_key_id != wanted:
                raise ValueError(f"sealed to owner key {record.owner_key_id}, not {wanted}")
            body = open_sealed(record, private_key)
            arrays = decode_body(body, record.content_type, owner.front_manifest.inputs)
        except ValueError as error:
            where = f"body of {record.time:.3f} (request {record.request_id or '-'})"
            problems.append(f"{where}: {error}")
            unread.append({**about, "problem": str(error)})
            continue
        count = len(next(iter(arrays.values())))
        pieces.append(_cast(arrays, owner))
        # input_sha256: the audit record's; first_row: where its rows start in ``inputs``
        requests.append(
            {**about, "input_sha256": input_digest(arrays), "first_row": rows, "rows": count}
        )
        rows += count
    inputs = (
        {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]} if pieces else {}
    )
    return SealedQueries(inputs, requests, problems, unread)


def _about(record: SealedRecord) -> dict[str, Any]:
    """What a sealed row says in clear of its body."""
    return {
        "time": record.time,
        "request_id": record.request_id,
        "body_sha256": record.body_sha256,
        "content_digest": content_digest(record.body_sha256),
        "content_type": record.content_type or V2_JSON,
        "signature_nonce": record.signature_nonce,
    }


def _cast(arrays: dict[str, np.ndarray], owner: OwnerModel) -> Arrays:
    specs = owner.front_manifest.inputs
    return {s.name: np.ascontiguousarray(arrays[s.name], numpy_dtype(s.datatype)) for s in specs}
