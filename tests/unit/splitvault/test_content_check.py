"""Each signed record's content label, against sealed bodies, with a front that doubles its
inputs (the checker only needs what the public tier would send for given inputs)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from private_core.watermark.triggers import TriggerRecord, encode_inputs
from public_api.sealing import V2_JSON, content_digest
from splitvault.ownership.content import MISMATCH, SIGNED_ONLY, VERIFIED, ContentChecker
from splitvault.ownership.sealed import SealedQueries

ROWS = np.arange(12, dtype=np.float32).reshape(3, 4)  # three input rows of one body
BODY = b'{"inputs": "the signed body"}'
SIGNED = hashlib.sha256(BODY).hexdigest()


def _front(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"act": arrays["x"] * 2}


def _record(nonce: str, activations: np.ndarray, digest: str = SIGNED) -> TriggerRecord:
    signature_input = (
        'sv=("@method" "content-digest" "splitvault-claims");created=1;keyid="k_a";'
        f'nonce="{nonce}";alg="ed25519";tag="splitvault-v1"'
    )
    signature = {
        "method": "POST",
        "content_digest": content_digest(digest),
        "claims": "",
        "signature_input": signature_input,
        "signature": "sv=:AA==:",
    }
    return TriggerRecord(
        time=1.0, model="m", query_id="00", label=0, answer=1, key_id="k_a",
        inputs=encode_inputs({"act": activations}), attribution="signed", signature=signature,
    )  # fmt: skip


def _body(nonce: str, digest: str = SIGNED, first_row: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "time": 1.0, "request_id": f"r-{nonce}", "body_sha256": digest,
        "content_type": V2_JSON, "signature_nonce": nonce, "first_row": first_row, "rows": 3,
        **extra,
    }  # fmt: skip


def _checker(*bodies: dict[str, Any], unread: tuple[dict[str, Any], ...] = ()) -> ContentChecker:
    inputs = {"x": np.concatenate([ROWS] * len(bodies))} if bodies else {}
    sealed = SealedQueries(inputs, list(bodies), [], list(unread))
    return ContentChecker(_front, sealed)


def test_the_signed_body_whose_front_gives_the_answered_row_is_content_verified() -> None:
    check = _checker(_body("n1")).check(_record("n1", ROWS[1] * 2 + 0.001))  # FP16-sized error
    assert (check.label, check.activations, check.sealed_request_id) == (VERIFIED, "match", "r-n1")


def test_other_activations_under_the_signed_body_are_a_mismatch() -> None:
    check = _checker(_body("n1")).check(_record("n1", ROWS[1] * 3))
    assert (check.label, check.activations) == (MISMATCH, "differ")


def test_a_sealed_body_other_than_signed_is_a_mismatch() -> None:
    other = hashlib.sha256(b"other").hexdigest()
    check = _checker(_body("n1", digest=other)).check(_record("n1", ROWS[0] * 2))
    assert check.label == MISMATCH and "SHA-256 differs" in check.reason


def test_two_bodies_sealed_under_one_signature_are_a_mismatch() -> None:
    other = hashlib.sha256(b"other").hexdigest()
    checker = _checker(_body("n1"), _body("n1", digest=other, first_row=3))
    assert checker.check(_record("n1", ROWS[0] * 2)).label == MISMATCH


def test_a_body_sealed_before_nonces_is_found_by_its_digest() -> None:
    assert _checker(_body("")).check(_record("n1", ROWS[2] * 2)).label == VERIFIED


def test_without_a_readable_sealed_body_it_is_signed_only() -> None:
    no_key = ContentChecker(_front, None).check(_record("n1", ROWS[0] * 2))
    assert (no_key.label, no_key.reason) == (
        SIGNED_ONLY,
        "no owner key given: sealed bodies not opened",
    )
    assert (
        _checker(_body("n2")).check(_record("n1", ROWS[0] * 2, digest="00" * 32)).label
        == SIGNED_ONLY
    )
    unread = _body("n1", problem="does not open")
    check = _checker(unread=(unread,)).check(_record("n1", ROWS[0] * 2))
    assert check.label == SIGNED_ONLY and "does not open" in check.reason
