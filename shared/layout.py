"""Where things live in a deployment folder made by ``splitvault init``.

DEPLOY/ca/                 private CA (key never mounted into a tier)
DEPLOY/secrets/kek         key-encryption key, handed to the private tier as a secret
DEPLOY/public/             all the public tier may hold: tls/, models/NAME/front.pt2, public.toml
DEPLOY/private/            all the private tier may hold: tls/, models/NAME/back.pt2.enc, private.toml
DEPLOY/public-replicas/N/  client.crt and client.key of public replica N beyond the first (each
                           replica holds only its own; the first's is public/tls/client.*)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PUBLIC_IDENTITY = "splitvault-public"  # the public server's CN, and the single client CN of
# deployments made before per-replica identities
PUBLIC_REPLICA_PREFIX = "splitvault-public-"  # client CN of public replica N: PREFIX + N
PRIVATE_IDENTITY = "splitvault-private"
FRONT_FILE = "front.pt2"
BACK_FILE = "back.pt2.enc"
REFERENCE_FILE = "reference.npz"  # natural-data profile of front activations (public tier)


@dataclass(frozen=True)
class TierDir:
    """One tier's folder: its TLS files, its models and its config file."""

    root: Path

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        return self.models / name

    @property
    def ca_cert(self) -> Path:
        return self.tls / "ca.crt"

    @property
    def state(self) -> Path:
        """What the tier writes (0700, checked at start: ``shared.state_files``)."""
        return self.root / "state"


@dataclass(frozen=True)
class DeployLayout:
    """Paths of a deployment folder."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def kek(self) -> Path:
        return self.root / "secrets" / "kek"

    @property
    def public(self) -> TierDir:
        return TierDir(self.root / "public")

    @property
    def private(self) -> TierDir:
        return TierDir(self.root / "private")

    @property
    def public_replicas(self) -> Path:
        """Client certificates of public replicas beyond the first, one folder per identity."""
        return self.root / "public-replicas"

    @property
    def public_config(self) -> Path:
        return self.public.root / "public.toml"

    @property
    def private_config(self) -> Path:
        return self.private.root / "private.toml"
