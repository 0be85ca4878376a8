"""The public tier's part in customer request signatures: check what it can, forward the rest.

This tier does not hold the customers' public keys (only the private tier does, registered from
an admin host), so it cannot verify a signature, and its checks protect nobody from itself: a
host that controls it could skip them. They refuse early, with a clear 401, what the private
tier would refuse anyway: a ``Content-Digest`` that does not match the body, a time outside
``signature_window_s``, claims that do not match the request (key, model, rows, shapes, k), and
an unsigned request from a key listed in ``require_signature_keys``. What passes is forwarded
as received in ``InferRequest.signature``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from protos import inference_pb2
from public_api.service import Decoded
from shared.errors import SignatureRefused
from shared.signatures import Claims, SignedRequest, check_digest, check_time, signature_params


def forwarded_signature(
    headers: Mapping[str, str],
    body: bytes,
    key_id: str | None,
    decoded: Decoded,
    *,
    required: bool,
    window_s: float,
) -> inference_pb2.RequestSignature | None:
    """The signature to forward for this request, None if unsigned; ``SignatureRefused``."""
    signed = SignedRequest.from_headers("POST", headers)
    if signed is None:
        if required:
            raise SignatureRefused(f"key {key_id} must sign its requests (RFC 9421)")
        return None
    check_digest(signed, body)
    params = signature_params(signed)
    check_time(params.created, time.time(), window_s)
    if params.key_id != key_id:
        raise SignatureRefused("request signature: keyid is not this request's API key id")
    claims = Claims.parse(signed.claims)
    shapes = {name: tuple(array.shape) for name, array in decoded.arrays.items()}
    mismatch = [
        name
        for name, claimed, actual in (
            ("key", claims.key_id, key_id),
            ("model", claims.model, decoded.model),
            ("rows", claims.rows, decoded.samples),
            ("k", claims.k, decoded.top_k),
            ("shapes", claims.shape_map(), shapes),
        )
        if claimed != actual
    ]
    if mismatch:
        raise SignatureRefused(
            f"request signature: the signed {', '.join(mismatch)} differ from this request"
        )
    return inference_pb2.RequestSignature(
        method=signed.method,
        content_digest=signed.content_digest,
        claims=signed.claims,
        signature_input=signed.signature_input,
        signature=signed.signature,
    )
