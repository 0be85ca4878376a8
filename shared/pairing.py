"""Front/back pairing: one id in both stage manifests of a ``pack``, checked by both tiers.

A model's two stages only fit each other when they come from the same ``pack``: a front stage
from one pack sends activations another pack's back stage does not expect (different names,
shapes or meaning). The id is derived from both stages' hashes, so re-packing the same program
gives the same id and any change to either stage gives a new one.
"""

from __future__ import annotations

import hashlib

_DOMAIN = b"splitvault-pairing-v1\x00"


def pairing_id(front_sha256: str, back_sha256: str) -> str:
    """The pairing id of a front and a back stage (32 lowercase hex digits)."""
    digest = hashlib.sha256(_DOMAIN + bytes.fromhex(front_sha256) + bytes.fromhex(back_sha256))
    return digest.hexdigest()[:32]


def mismatch_reason(model: str, front: str | None, back: str | None) -> str | None:
    """Why the two stages of ``model`` do not fit (``None`` when they do), for operators.

    Two stages without an id (packed before ids existed) are taken as a pair.
    """
    if front == back:
        return None
    return (
        f"model {model!r}: the public and private tiers hold stages of different packs "
        f"(front {front or 'unpaired'}, back {back or 'unpaired'}); "
        "copy both tiers' folders from one pack and restart both tiers"
    )
