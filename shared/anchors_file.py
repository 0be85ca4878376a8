"""The anchors file: the private ledger's audit anchors, exported on the private host.

``splitvault ledger export-anchors`` writes it from each replica's segment; ``splitvault audit
verify --anchors FILE`` and ``splitvault evidence --anchors FILE`` read it. Per replica it holds
the signing keys its ledger registered, the ledger's length and head, and every anchor receipt.
Because it comes from the private host, deleting or rewriting receipts on the public host does
not change what it says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.anchor_receipt import AnchorReceipt, load_public_key

FORMAT = "splitvault-anchors/1"


@dataclass(frozen=True)
class ReplicaAnchors:
    """One replica's ledger: its signing keys (id -> base64 key), length, head and anchors."""

    replica_id: str
    keys: dict[str, str]
    ledger_records: int
    ledger_head: str
    anchors: list[AnchorReceipt] = field(default_factory=list)

    def public_key(self, key_id: str) -> Ed25519PublicKey | None:
        """The registered key with id ``key_id``, if any."""
        text = self.keys.get(key_id)
        return None if text is None else load_public_key(text)

    def to_json(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "keys": self.keys,
            "ledger_records": self.ledger_records,
            "ledger_head": self.ledger_head,
            "anchors": [anchor.to_json() for anchor in self.anchors],
        }


@dataclass(frozen=True)
class AnchorsFile:
    """Every replica's anchors, as exported at ``exported_at``."""

    exported_at: float
    replicas: list[ReplicaAnchors]

    def write(self, path: Path) -> None:
        """Write the file as JSON."""
        body = {
            "format": FORMAT,
            "exported_at": self.exported_at,
            "replicas": [replica.to_json() for replica in self.replicas],
        }
        path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", "utf-8")

    @classmethod
    def read(cls, path: Path) -> AnchorsFile:
        """Parse ``path``; ``ValueError`` when it is not an anchors file."""
        try:
            body = json.loads(path.read_text("utf-8"))
            if body.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            replicas = [_replica(item) for item in body["replicas"]]
            return cls(float(body["exported_at"]), replicas)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not an anchors file ({error})") from None


def _replica(item: dict[str, Any]) -> ReplicaAnchors:
    keys = {str(k): str(v) for k, v in item["keys"].items()}
    return ReplicaAnchors(
        replica_id=str(item["replica_id"]),
        keys=keys,
        ledger_records=int(item["ledger_records"]),
        ledger_head=str(item["ledger_head"]),
        anchors=[AnchorReceipt.from_json(anchor) for anchor in item["anchors"]],
    )
