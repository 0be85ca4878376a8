"""The private tier's attribution: registered signers, claims against the request, nonces."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from splitvault_client import RequestSigner, create_signing_key

from private_core.attribution import PUBLIC, SIGNED, Attributor
from private_core.signers import SIGNATURES_DB, SqliteSignatureState
from private_core.watermark.engine import QueryContext
from protos import inference_pb2
from shared.errors import SignatureRefused
from shared.manifest import DimSpec, StageManifest, TensorSpec
from shared.signatures import SignedRequest, load_public_key, signature_params

KEY_ID, DEPLOYMENT, MODEL = "k_0123abcd", "dep-1", "toy"
BATCH, SEQ = DimSpec(name="batch", min=1, max=64), DimSpec(name="seq", min=1, max=32)
MANIFEST = StageManifest(
    model=MODEL,
    stage="back",
    file="back.pt2.enc",
    encrypted=True,
    sha256="0" * 64,
    inputs=[
        TensorSpec(name="hidden", datatype="FP16", shape=[BATCH, SEQ, 8], source="front:hidden"),
        TensorSpec(name="mask", datatype="INT64", shape=[BATCH, SEQ], source="request:mask"),
    ],
    outputs=[TensorSpec(name="out", datatype="FP32", shape=[BATCH, 4])],
    tiers={},
    torch_version="test",
)
BODY = b'{"inputs": "as the client sent them"}'


@pytest.fixture
def signer(tmp_path: Path) -> RequestSigner:
    create_signing_key(tmp_path / "key.json", key_id=KEY_ID, deployment=DEPLOYMENT)
    return RequestSigner.load(tmp_path / "key.json")


@pytest.fixture
def state(tmp_path: Path, signer: RequestSigner) -> SqliteSignatureState:
    state = SqliteSignatureState(tmp_path / "state" / SIGNATURES_DB)
    state.register(KEY_ID, load_public_key(signer.public_key()))
    return state


def _attributor(state: SqliteSignatureState) -> Attributor:
    return Attributor(state, state, DEPLOYMENT, window_s=300.0)


def _arrays(rows: int, seq: int = 5) -> dict[str, np.ndarray]:
    return {
        "hidden": np.zeros((rows, seq, 8), np.float16),
        "mask": np.ones((rows, seq), np.int64),
    }


def _request(
    signer: RequestSigner | None,
    rows: int = 3,
    *,
    key_id: str = KEY_ID,
    top_k: int = 2,
    claimed_rows: int | None = None,
    created: float | None = None,
) -> inference_pb2.InferRequest:
    request = inference_pb2.InferRequest(model=MODEL, top_k=top_k, key_id=key_id, request_id="r")
    if signer is not None:
        claimed = claimed_rows or rows
        shapes = {"input_ids": (claimed, 5), "mask": (claimed, 5)}
        when = None if created is None else dt.datetime.fromtimestamp(created, dt.UTC)
        headers = signer.headers(MODEL, BODY, shapes, top_k, created=when)
        signed = SignedRequest.from_headers("POST", {k.lower(): v for k, v in headers.items()})
        assert signed is not None
        request.signature.CopyFrom(inference_pb2.RequestSignature(**signed.record()))
    return request


def _wire(request: inference_pb2.InferRequest) -> SignedRequest:
    wire = request.signature
    return SignedRequest(
        wire.method, wire.content_digest, wire.claims, wire.signature_input, wire.signature
    )


async def _attribute(
    attributor: Attributor, request: inference_pb2.InferRequest, rows: int = 3
) -> QueryContext:
    arrays = _arrays(rows)
    return await attributor.attribute(request, MANIFEST, arrays, {"batch": rows, "seq": 5})


async def test_a_signed_request_is_answered_once_as_signed(
    state: SqliteSignatureState, signer: RequestSigner
) -> None:
    attributor = _attributor(state)
    request = _request(signer)
    context = await _attribute(attributor, request)
    assert (context.attribution, context.key_id) == (SIGNED, KEY_ID)
    assert context.signature is not None and context.signature["claims"] == request.signature.claims
    with pytest.raises(SignatureRefused, match="already answered"):
        await _attribute(attributor, request)


async def test_a_replay_is_refused_after_a_restart(
    tmp_path: Path, state: SqliteSignatureState, signer: RequestSigner
) -> None:
    request = _request(signer)
    await _attribute(_attributor(state), request)
    state.close()
    reopened = SqliteSignatureState(tmp_path / "state" / SIGNATURES_DB)
    with pytest.raises(SignatureRefused, match="already answered"):
        await _attribute(_attributor(reopened), request)
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / SIGNATURES_DB).st_mode)
    assert mode == 0o600


async def test_unsigned_requests_under_a_registered_key_are_refused(
    state: SqliteSignatureState,
) -> None:
    with pytest.raises(SignatureRefused, match="signs its requests"):
        await _attribute(_attributor(state), _request(None))


async def test_unsigned_requests_of_other_keys_are_attributed_to_the_public_tier(
    state: SqliteSignatureState,
) -> None:
    context = await _attribute(_attributor(state), _request(None, key_id="k_bearer00"))
    assert (context.attribution, context.key_id, context.signature) == (PUBLIC, "k_bearer00", None)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"claimed_rows": 2}, "rows, shape of mask"),  # signed for 2 rows, 3 sent
        ({"top_k": 5, "signed_k": 2}, "k"),
    ],
)
async def test_claims_must_match_what_is_answered(
    state: SqliteSignatureState, signer: RequestSigner, change: dict[str, Any], reason: str
) -> None:
    signed_k = change.pop("signed_k", None)
    request = _request(signer, **change)
    if signed_k is not None:  # signed with one k, sent with another
        request = _request(signer, top_k=signed_k)
        request.top_k = change["top_k"]
    with pytest.raises(SignatureRefused, match=f"signed {reason} differ"):
        await _attribute(_attributor(state), request)


async def test_a_signature_under_another_key_id_is_refused(
    state: SqliteSignatureState, signer: RequestSigner
) -> None:
    request = _request(signer)
    request.key_id = "k_victim00"
    with pytest.raises(SignatureRefused, match="keyid differs"):
        await _attribute(_attributor(state), request)


async def test_an_unregistered_signer_is_refused(tmp_path: Path, signer: RequestSigner) -> None:
    empty = SqliteSignatureState(tmp_path / "empty" / SIGNATURES_DB)
    with pytest.raises(SignatureRefused, match="no signer is registered"):
        await _attribute(_attributor(empty), _request(signer))


async def test_a_stale_signature_is_refused_and_its_nonce_not_spent(
    state: SqliteSignatureState, signer: RequestSigner
) -> None:
    stale = _request(signer, created=time.time() - 3600)
    with pytest.raises(SignatureRefused, match="outside the accepted window"):
        await _attribute(_attributor(state), stale)
    params = signature_params(_wire(stale))
    assert state.use(KEY_ID, params.nonce, params.created, forget_before=0.0)  # not spent


async def test_another_deployment_is_refused(
    state: SqliteSignatureState, signer: RequestSigner
) -> None:
    other = Attributor(state, state, "dep-2", window_s=300.0)
    with pytest.raises(SignatureRefused, match="signed deployment differ"):
        await _attribute(other, _request(signer))


async def test_a_signer_registered_by_another_process_applies_to_the_next_unsigned_request(
    tmp_path: Path, signer: RequestSigner
) -> None:
    """Unsigned requests are looked up on the event loop; the CLI registers through a connection
    of its own, so the tier's lookups must see its commits at once, and its removals too."""
    path = tmp_path / "fresh" / SIGNATURES_DB
    tier_state = SqliteSignatureState(path)
    attributor = _attributor(tier_state)
    assert tier_state.local_lookups
    assert (await _attribute(attributor, _request(None))).attribution == PUBLIC
    cli_state = SqliteSignatureState(path)
    cli_state.register(KEY_ID, load_public_key(signer.public_key()))
    with pytest.raises(SignatureRefused, match="signs its requests"):
        await _attribute(attributor, _request(None))
    assert cli_state.remove(KEY_ID)
    assert (await _attribute(attributor, _request(None))).attribution == PUBLIC
    cli_state.close()
    tier_state.close()


async def test_an_unsigned_lookup_does_not_wait_for_a_nonce_being_written(
    state: SqliteSignatureState,
) -> None:
    """The writer's lock held (a nonce insert or a prune in a worker thread) does not hold up
    the event loop's lookup of an unsigned request's key id."""
    request = _request(None, key_id="k_bearer00")
    with state._lock:  # what a worker thread holds while it writes a nonce
        context = await asyncio.wait_for(_attribute(_attributor(state), request), timeout=5)
    assert context.attribution == PUBLIC
