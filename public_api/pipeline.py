"""What every ingress does with an admitted, decoded request: limits, inference, monitor, audit.

The REST route and the v2 gRPC servicer both end here, so that a request costs the same
samples, is seen by the same monitor and leaves the same audit record whichever way it came.
"""

from __future__ import annotations

from protos import inference_pb2
from public_api.context import RequestContext
from public_api.protection import Caller
from public_api.sealing import V2_JSON, signature_nonce
from public_api.service import Decoded, InferenceOutcome
from public_api.state import PublicState
from shared import phases


async def serve_inference(
    state: PublicState,
    caller: Caller,
    decoded: Decoded,
    signature: inference_pb2.RequestSignature | None,
    sealed_body: bytes | None = None,
    request_id: str = "",
    content_type: str = V2_JSON,
    context: RequestContext | None = None,
) -> InferenceOutcome:
    """Charge the request's samples (429), answer it, let the monitor see it and audit it
    (``Protection.record_served``: committed before it returns, by default). ``sealed_body``:
    the body received, encoded as ``content_type``, sealed to the owner's key once answered
    with the signature's nonce (``public_api.sealing``). ``context`` is marked audited once the
    record stands."""
    sealer = state.sealer if sealed_body is not None else None
    if sealer is not None:  # refuse before any work when the body could not be kept
        sealer.check_accepting()
    await state.protection.limit(caller, decoded.model, decoded.samples)
    phases.mark("limited")
    outcome = await state.service.infer(decoded, key_id=caller.key_id, signature=signature)
    if sealer is not None and sealed_body is not None:
        nonce = signature_nonce(signature)
        sealer.submit(caller.key_id, decoded.model, request_id, sealed_body, content_type, nonce)
        phases.mark("sealed")
    specs = state.service.stage(decoded.model).manifest.outputs
    await state.protection.record_served(caller, decoded.model, outcome, specs, context)
    return outcome
