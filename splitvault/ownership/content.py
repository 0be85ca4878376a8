"""Content verification: a signed record's sealed body against what the customer signed.

The private tier keeps, with each watermarked answer of a signed request, the customer's
signature (over the body's RFC 9530 ``Content-Digest``) and the activations it answered. The
public tier seals each served body to the owner's key with the signature's nonce. Offline, with
the owner's private key, each signed record is labelled:

- ``signed and content-verified``: the sealed body carrying the signature's nonce (or, for
  bodies sealed before nonces were kept, one with the signed digest) has exactly the SHA-256
  the customer signed, **and** the public front, run here on that body, gives the activations
  the private tier answered (one of the body's rows, every value within ``TOLERANCE`` of the
  row's largest activation);
- ``content mismatch``: the sealed body's digest differs from the signed one, or the
  activations answered are no row of the signed body's front: the public host substituted
  content under a genuine signature;
- ``signed only``: no owner key was given, no sealed body carries the signature, or that body
  cannot be opened or read: the signature holds, the content is unchecked.

What this proves: the customer sent that body (its signature covers the digest), and the
private tier answered the front's output on it. It does not stop a host that controls the
public tier from sending other activations under a genuine signature; it makes that visible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import http_sf
import numpy as np

from private_core.watermark.triggers import TriggerRecord
from shared.errors import SignatureRefused
from shared.signatures import SignedRequest, signature_params
from splitvault.ownership.owner import Arrays
from splitvault.ownership.sealed import SealedQueries

Front = Callable[[Arrays], Arrays]  # inputs -> what the public tier sends the private tier

VERIFIED, SIGNED_ONLY, MISMATCH = "signed and content-verified", "signed only", "content mismatch"
TOLERANCE = 0.01  # of the row's largest activation: FP16 transport and batching, not content


@dataclass(frozen=True)
class ContentCheck:
    """A signed record's content label, why, and which sealed body it was checked against."""

    label: str
    reason: str
    sealed_request_id: str | None = None
    activations: str = "not checked"  # "match" or "differ" once recomputed

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def signed_sha256(content_digest: str) -> bytes | None:
    """The ``sha-256`` member of a ``Content-Digest`` value; None if it has none."""
    try:
        members: Any = http_sf.parse(content_digest.encode("ascii"), tltype="dictionary")
        value = members["sha-256"][0]
    except (ValueError, KeyError, TypeError, IndexError, UnicodeError):
        return None
    return value if isinstance(value, bytes) else None


class ContentChecker:
    """Checks signed records against one key's opened sealed bodies (see the module)."""

    def __init__(self, front: Front, sealed: SealedQueries | None) -> None:
        """``front``: what the public tier sends the private tier for given inputs
        (``OwnerModel.back_inputs``); ``sealed``: the key's opened bodies, None without the
        owner's key."""
        self._front, self._sealed = front, sealed
        self._by_nonce: dict[str, list[dict[str, Any]]] = {}
        self._by_digest: dict[str, dict[str, Any]] = {}
        self._fronts: dict[int, Arrays] = {}
        for index, request in enumerate(sealed.requests if sealed else []):
            request = {**request, "index": index}
            self._by_digest.setdefault(request["body_sha256"], request)
            self._by_nonce.setdefault(request["signature_nonce"], []).append(request)
        for request in sealed.unread if sealed else []:
            self._by_nonce.setdefault(request["signature_nonce"], []).append(request)
        self._by_nonce.pop("", None)  # unsigned bodies carry no nonce

    def check(self, record: TriggerRecord) -> ContentCheck:
        """The content label of a record whose signature verified."""
        if self._sealed is None:
            return ContentCheck(SIGNED_ONLY, "no owner key given: sealed bodies not opened")
        try:
            nonce = signature_params(SignedRequest(**record.signature)).nonce
        except (SignatureRefused, TypeError):
            return ContentCheck(SIGNED_ONLY, "the recorded signature has no readable nonce")
        signed = signed_sha256(record.signature.get("content_digest", ""))
        if signed is None:
            return ContentCheck(SIGNED_ONLY, "the signed Content-Digest has no sha-256")
        bodies = self._bodies(nonce, signed)
        if not bodies:
            return ContentCheck(SIGNED_ONLY, "no sealed body carries this signature")
        readable = [body for body in bodies if "problem" not in body]
        if not readable:
            reason = f"its sealed body cannot be read: {bodies[0]['problem']}"
            return ContentCheck(SIGNED_ONLY, reason, bodies[0]["request_id"] or None)
        other = [b for b in readable if bytes.fromhex(b["body_sha256"]) != signed]
        if other:  # a host that seals another body, or two bodies, under a signature
            reason = "a sealed body's SHA-256 differs from the Content-Digest the customer signed"
            return ContentCheck(MISMATCH, reason, other[0]["request_id"] or None, "not checked")
        body = readable[0]
        if not self._answered_from(record, body):
            reason = "the activations answered are not the public front's output on the signed body"
            return ContentCheck(MISMATCH, reason, body["request_id"] or None, "differ")
        reason = "the sealed body is the signed one, and its front gives the activations answered"
        return ContentCheck(VERIFIED, reason, body["request_id"] or None, "match")

    def _bodies(self, nonce: str, signed: bytes) -> list[dict[str, Any]]:
        """The sealed bodies under ``nonce``; else (sealed before nonces) one with the digest."""
        found = self._by_nonce.get(nonce)
        if found:
            return found
        body = self._by_digest.get(signed.hex())
        return [] if body is None else [body]

    def _answered_from(self, record: TriggerRecord, body: Mapping[str, Any]) -> bool:
        """Whether the record's activations are the front's output on one row of ``body``."""
        index, sealed = int(body["index"]), self._sealed
        if sealed is None:
            return False
        if index not in self._fronts:
            self._fronts[index] = self._front(sealed.rows_of(body))
        front, answered = self._fronts[index], record.arrays()
        if set(front) != set(answered):
            return False
        rows = len(next(iter(front.values())))
        return any(
            all(_close(front[name][row], answered[name]) for name in front) for row in range(rows)
        )


def _close(recomputed: np.ndarray, answered: np.ndarray) -> bool:
    """Same size, and every value within ``TOLERANCE`` of the largest recomputed one."""
    if recomputed.size != answered.size:
        return False
    ours = recomputed.astype(np.float64).ravel()
    theirs = answered.astype(np.float64).ravel()
    scale = max(float(np.abs(ours).max(initial=0.0)), 1e-6)
    return bool(np.all(np.abs(ours - theirs) <= TOLERANCE * scale))
