"""How each trigger record ties its answer to an API key, as the evidence report labels it.

- ``signed``: the customer's own request signature (kept in the record) verifies again here,
  offline, against the signer registered for the key in the private tier's registry, and its
  claims name this key and model. The public tier could not have made it. The report then
  checks its content (``splitvault.ownership.content``): ``signed and content-verified``,
  ``signed only`` or ``content mismatch``.
- ``signed, not verified here``: the record says signed but the signature cannot be checked
  again (no registry here, the signer was removed, or it fails): weigh it as ``PUBLIC``.
- ``PUBLIC``: attributed by the public tier alone (bearer keys, stock clients that cannot sign,
  every record made before signatures): a host that controls the public tier could have sent
  the key id.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

from private_core.private_redis_settings import configured_state_store
from private_core.settings import private_state_dir
from private_core.signers import SIGNATURES_DB, SqliteSignatureState
from private_core.watermark.triggers import TriggerRecord
from shared.errors import SignatureRefused
from shared.signatures import SignedRequest, load_public_key, signature_params, verify

SIGNED, UNVERIFIED = "signed", "signed, not verified here"
PUBLIC = "attributed by the public tier alone"


def signer_keys(deploy: Path) -> dict[str, str]:
    """The registered signers of a deployment: from the private store when the private tier
    keeps one, else its state folder (empty when it has no registry here)."""
    if configured_state_store(deploy).redis_url is not None:
        from splitvault.signers import deployment_signature_state

        with deployment_signature_state(deploy) as state:
            return state.signers()
    path = private_state_dir(deploy) / SIGNATURES_DB
    if not path.is_file():
        return {}
    with closing(SqliteSignatureState(path)) as state:
        return state.signers()


def label(record: TriggerRecord, signers: dict[str, str]) -> str:
    """The record's attribution label (see the module)."""
    if record.attribution != SIGNED:
        return PUBLIC
    try:
        signed = SignedRequest(**record.signature)
        created = signature_params(signed).created
        text = signers.get(record.key_id)
        if text is None:
            return UNVERIFIED
        verified = verify(signed, load_public_key(text), now=created, window_s=1.0)
    except (SignatureRefused, TypeError, ValueError):
        return UNVERIFIED
    claims = verified.claims
    return SIGNED if (claims.key_id, claims.model) == (record.key_id, record.model) else UNVERIFIED
