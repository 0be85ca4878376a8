"""The owner's side of sealed request bodies: the key pair, and an API key's queries as
verification candidates, opened offline with the private key (``public_api.sealing``).

``splitvault owner keygen`` writes the private key to ``DEPLOY/owner/owner.key`` (0600; like
``DEPLOY/ca/``, never mounted into a tier: move it offline) and the public key to
``DEPLOY/public/owner.pub``, where the public tier finds it at start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from public_api.audit import input_digest
from public_api.sealed_store import SEALED_DB, read_sealed
from public_api.sealing import OWNER_PUBLIC_KEY, content_digest, open_sealed, owner_key_id
from public_api.settings import public_state_dir
from public_api.v2 import InferenceRequest
from shared.layout import DeployLayout
from shared.state_files import private_dir
from shared.tensor_codec import array_from_json, numpy_dtype
from splitvault.ownership.owner import Arrays, OwnerModel

OWNER_DIR, OWNER_KEY = "owner", "owner.key"
_MAX_ELEMENTS = 1 << 31


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
    order) and, per body, how it is attributed."""

    inputs: Arrays
    requests: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

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
    for record in read_sealed(path, key_id):
        if record.model != owner.name:
            continue
        where = f"body of {record.time:.3f} (request {record.request_id or '-'})"
        if record.owner_key_id != wanted:
            problems.append(f"{where}: sealed to owner key {record.owner_key_id}, not {wanted}")
            continue
        try:
            arrays = _decode(open_sealed(record, private_key), owner)
        except ValueError as error:
            problems.append(f"{where}: {error}")
            continue
        pieces.append(_cast(arrays, owner))
        requests.append(
            {
                "time": record.time,
                "request_id": record.request_id,
                "body_sha256": record.body_sha256,
                "content_digest": content_digest(record.body_sha256),
                "input_sha256": input_digest(arrays),  # the audit record's input_sha256
                "rows": len(next(iter(arrays.values()))),
            }
        )
    inputs = (
        {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]} if pieces else {}
    )
    return SealedQueries(inputs, requests, problems)


def _decode(body: bytes, owner: OwnerModel) -> dict[str, np.ndarray]:
    """A v2 request body's inputs as the public tier decoded them."""
    try:
        request = InferenceRequest.model_validate(json.loads(body))
    except ValueError as error:
        raise ValueError(f"not a v2 request body: {error}") from None
    items = {item.name: item for item in request.inputs}
    arrays = {}
    for spec in owner.front_manifest.inputs:
        item = items.get(spec.name)
        if item is None:
            raise ValueError(f"the body lacks the input {spec.name!r}")
        try:
            arrays[spec.name] = array_from_json(
                item.data, item.datatype, item.shape, max_elements=_MAX_ELEMENTS
            )
        except Exception as error:
            raise ValueError(f"input {spec.name!r} does not decode: {error}") from None
    return arrays


def _cast(arrays: dict[str, np.ndarray], owner: OwnerModel) -> Arrays:
    specs = owner.front_manifest.inputs
    return {s.name: np.ascontiguousarray(arrays[s.name], numpy_dtype(s.datatype)) for s in specs}
