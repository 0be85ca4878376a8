"""Private tier settings (``private.toml``, ``SPLITVAULT_PRIVATE_*`` environment, secrets)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from private_core.admission_settings import AdmissionSettings
from private_core.monitor_settings import ActivationMonitorSettings
from private_core.private_redis_settings import StateStoreSettings
from shared.layout import PRIVATE_IDENTITY, PUBLIC_IDENTITY, PUBLIC_REPLICA_PREFIX, DeployLayout
from shared.settings import TierSettings, configured_state_dir

ENV_PREFIX = "SPLITVAULT_PRIVATE_"


class PrivateSettings(TierSettings):
    """Where the private tier's folder and KEK are, how it listens and whom it serves."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    kek_file: Path | None = None
    # Read from /run/secrets/kek (compose and Kubernetes secrets) when no file is named.
    kek: SecretStr | None = None
    allowed_identities: list[str] = Field(default_factory=lambda: [PUBLIC_IDENTITY])
    health_identities: list[str] = Field(
        default_factory=lambda: [PUBLIC_IDENTITY, PRIVATE_IDENTITY]
    )
    # Per-replica public identities (splitvault init --public-replicas, certs add-public):
    # any CN starting with one of these is admitted to inference and health, as well as the
    # names above ("splitvault-public" is the one identity of deployments made before).
    allowed_identity_prefixes: list[str] = Field(default_factory=lambda: [PUBLIC_REPLICA_PREFIX])
    # Budgets in samples per identity, unsigned traffic and key (private_core/admission.py).
    admission: AdmissionSettings = AdmissionSettings()
    torch_threads: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), ge=1)
    # Keep torch_threads x concurrent_batches within the cores this tier may use: OpenMP
    # threads spin-wait on each other, so oversubscribed cores (another tier, other batches)
    # were measured to slow MiniLM about 30 times. The inter-op pool (torch.jit.fork; unused
    # by exported stages) is set once at startup and kept small.
    torch_interop_threads: int = Field(default=1, ge=1)
    # Intra-op threads for a batch of one request when nothing else is queued or running
    # (shared/compute_threads.py): None = every core this process may use, so a lone request
    # does not run on torch_threads while the rest idle. Set it to torch_threads to turn off.
    lone_request_threads: int | None = Field(default=None, ge=1, le=1024)
    # Debug: log each request's phase marks (shared/phases.py, bench/phase_breakdown.py --lone);
    # meaningful only for requests sent one at a time. Off: no cost.
    debug_phase_marks: bool = False
    # Dynamic batching (Triton's dynamic batcher): rows per back-stage call (None: each model's
    # own max_batch_size, which always caps it), how long the oldest queued request may wait for
    # its batch to fill, rows allowed to wait per model before requests are refused as
    # overloaded (503), batches of one model running at once, and zero-padding of dims that
    # pad exactly (checked per model at startup). max_batch_size=1 with no delay: no batching.
    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_queue_delay_us: int = Field(default=2000, ge=0, le=1_000_000)
    max_queue_size: int = Field(default=512, ge=1)
    concurrent_batches: int = Field(default=2, ge=1, le=64)
    pad_batches: bool = True
    # Raised at startup to fit the largest request a model allows (grpc_message_limit log).
    max_message_mb: int = Field(default=64, ge=4, le=2047)
    grace_period_s: float = Field(default=10.0, ge=0)
    lock_memory: bool = True
    # Prometheus metrics on a separate plain-HTTP port (internal network only); None: off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=9464, ge=0, le=65535)
    log_level: str = "INFO"
    # Log certificate_expiring when a certificate this tier loaded expires within this many days.
    cert_warning_days: float = Field(default=30.0, ge=0)
    # Customer request signatures: a signature's ``created`` must be within this many seconds
    # of this tier's clock (either way); its nonce is remembered that long (shared/signatures).
    signature_window_s: float = Field(default=300.0, gt=0, le=86400)

    # The private ledger (private_core/ledger.py), in state_dir/ledger: this replica's segment
    # name (None: the host name, a StatefulSet pod's own) and the certificate identities that
    # may anchor the public tier's audit trail there.
    replica_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    anchor_identities: list[str] = Field(default_factory=lambda: [PUBLIC_IDENTITY])
    # The activation monitor (private_core/activation_monitor.py): [activation_monitor] in
    # private.toml, SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__ACTION=alert, ...
    activation_monitor: ActivationMonitorSettings = Field(default_factory=ActivationMonitorSettings)
    # The private tier's shared store (private_core/private_redis_settings.py): [state_store] in
    # private.toml, SPLITVAULT_PRIVATE_STATE_STORE__REDIS_URL=redis://..., ... Unset: budgets,
    # nonces and signers in this replica's state folder (one private replica).
    state_store: StateStoreSettings = Field(default_factory=StateStoreSettings)

    @model_validator(mode="after")
    def _needs_a_kek(self) -> PrivateSettings:
        if self.kek_file is None and self.kek is None:
            raise ValueError("no KEK: set kek_file or provide the secret 'kek'")
        return self

    @model_validator(mode="after")
    def _no_empty_prefix(self) -> PrivateSettings:
        if any(not prefix for prefix in self.allowed_identity_prefixes):
            raise ValueError("an empty allowed_identity_prefixes entry would admit any identity")
        return self


def private_state_dir(deploy: Path) -> Path:
    """The private tier's state folder of a deployment (the watermark trigger log), where the
    tier's settings put it."""
    layout = DeployLayout(deploy)
    return configured_state_dir(layout.private.root, layout.private_config, ENV_PREFIX)
