"""Who a request is recorded under: the customer's verified signature, or the public tier's word.

The public tier sends the API key id it admitted a request with. On its own that is only its
assertion (a host that controls the public tier can send any key id), so the private tier:

- answers an unsigned request under ``key_id`` as ``public`` attribution, unless that key id
  has a registered signer: then the request is refused (``SignatureRefused``);
- verifies a signed request against the registered key for its key id (RFC 9421, Ed25519,
  ``shared.signatures``), within ``window_s`` of its clock, and checks the claims against what
  it is asked to answer: deployment, model, rows, k and the shapes of the request inputs it
  receives as sent; then it records the nonce, refusing one already answered. Only then is the
  request answered, as ``signed`` attribution, the signature kept with its trigger records.

So without a customer's signing key nobody can make this tier record a call under that key id
that the customer did not sign, and each signed request yields at most what it declared, once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from private_core.signers import NonceStore, SignerRegistry
from private_core.watermark.engine import QueryContext
from protos import inference_pb2
from shared.errors import SignatureRefused
from shared.logs import get_logger
from shared.manifest import BATCH_DIM, StageManifest
from shared.signatures import Claims, SignedRequest, signature_params, verify

log = get_logger(__name__)
SIGNED, PUBLIC = "signed", "public"
_REQUEST_SOURCE = "request:"


class Attributor:
    """Checks each request's attribution before it is answered (see the module)."""

    def __init__(
        self,
        registry: SignerRegistry,
        nonces: NonceStore,
        deployment: str,
        window_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry, self._nonces = registry, nonces
        self._deployment, self._window_s, self._clock = deployment, window_s, clock

    async def attribute(
        self,
        request: inference_pb2.InferRequest,
        manifest: StageManifest,
        arrays: Mapping[str, Any],
        sizes: Mapping[str, int],
    ) -> QueryContext:
        """The request's ``QueryContext``; ``SignatureRefused`` (logged) when refused."""
        context = QueryContext.of(request)
        signed = request.HasField("signature")
        if not request.key_id and not signed:
            return context
        try:
            if not signed and self._registry.local_lookups:
                # An unsigned request only needs its key id looked up: microseconds in a local
                # file, cheaper than a hand-off to a worker thread and back.
                return self._check(request, manifest, arrays, sizes, context)
            return await asyncio.to_thread(self._check, request, manifest, arrays, sizes, context)
        except SignatureRefused as refusal:
            log.warning(
                "request_signature_refused",
                key_id=request.key_id,
                model=request.model,
                request_id=request.request_id,
                reason=refusal.message,
            )
            raise

    def _check(
        self,
        request: inference_pb2.InferRequest,
        manifest: StageManifest,
        arrays: Mapping[str, Any],
        sizes: Mapping[str, int],
        context: QueryContext,
    ) -> QueryContext:
        if not request.HasField("signature"):
            if self._registry.public_key(request.key_id) is not None:
                raise SignatureRefused(
                    f"key {request.key_id} signs its requests; this one carries no signature"
                )
            return context
        wire = request.signature
        signed = SignedRequest(
            wire.method, wire.content_digest, wire.claims, wire.signature_input, wire.signature
        )
        key_id = signature_params(signed).key_id
        if key_id != request.key_id:
            raise SignatureRefused("request signature: keyid differs from the request's key")
        public_key = self._registry.public_key(key_id)
        if public_key is None:
            raise SignatureRefused(f"request signature: no signer is registered for {key_id}")
        now = self._clock()
        verified = verify(signed, public_key, now=now, window_s=self._window_s)
        self._check_claims(verified.claims, request, manifest, arrays, sizes)
        forget = now - self._window_s - 1
        if not self._nonces.use(key_id, verified.nonce, verified.created, forget_before=forget):
            raise SignatureRefused("request signature: this signed request was already answered")
        return replace(context, attribution=SIGNED, signature=signed.record())

    def _check_claims(
        self,
        claims: Claims,
        request: inference_pb2.InferRequest,
        manifest: StageManifest,
        arrays: Mapping[str, Any],
        sizes: Mapping[str, int],
    ) -> None:
        rows = max(sizes.get(BATCH_DIM, 0), 1)
        mismatch = [
            name
            for name, claimed, actual in (
                ("deployment", claims.deployment, self._deployment),
                ("model", claims.model, request.model),
                ("rows", claims.rows, rows),
                ("k", claims.k, int(request.top_k)),
            )
            if claimed != actual
        ]
        shapes = claims.shape_map()
        for spec in manifest.inputs:
            source = spec.source or ""
            if source.startswith(_REQUEST_SOURCE):
                name = source[len(_REQUEST_SOURCE) :]
                if shapes.get(name) != tuple(arrays[spec.name].shape):
                    mismatch.append(f"shape of {name}")
        if mismatch:
            raise SignatureRefused(
                f"request signature: the signed {', '.join(mismatch)} differ from this request"
            )
