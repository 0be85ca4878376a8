"""Load each encrypted back stage into memory only, and remember why a model failed to load.

``torch.export.load`` unpickles, so a file is deserialized only after every chunk has been
authenticated and its plaintext hash matches the manifest: authentication is what makes
loading safe. A model that fails is reported by name with a reason, never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from private_core.activation_profile import (
    PROFILE_FILE,
    ActivationProfile,
    ProfileError,
    load_profile,
)
from private_core.watermark.engine import ModelWatermark
from private_core.watermark.keys import WATERMARK_KEY_FILE, WatermarkKeyError, load_key
from private_core.watermark.triggers import TRIGGER_DIR
from shared.crypto import DecryptionError, decrypt_bytes
from shared.errors import ModelNotFound, ModelNotReady
from shared.exported import serving_module
from shared.keys import KeyProvider
from shared.layout import TierDir
from shared.logs import get_logger
from shared.manifest import ModelConfig, StageManifest, read_config, read_manifest
from shared.pairing import mismatch_reason
from shared.settings import default_state_dir

log = get_logger(__name__)


@dataclass(frozen=True)
class BackStage:
    """A loaded back stage: its config, manifest, callable module, watermark (if on) and the
    activation monitor's reference profile (if ``pack`` made one)."""

    config: ModelConfig
    manifest: StageManifest
    module: torch.nn.Module
    watermark: ModelWatermark | None = None
    activation_profile: ActivationProfile | None = None


@dataclass
class ModelStore:
    """Every model found in the private tier's folder: loaded, or failed with a reason."""

    loaded: dict[str, BackStage] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # (model, front pairing id) pairs already logged as mismatched: one log line each.
    _mismatches: set[tuple[str, str]] = field(default_factory=set)

    def get(self, name: str) -> BackStage:
        """The loaded model ``name``, or ``ModelNotFound`` / ``ModelNotReady``."""
        if name in self.loaded:
            return self.loaded[name]
        if name in self.failed:
            raise ModelNotReady(f"model {name!r} is not loaded")
        raise ModelNotFound(f"model {name!r} is not deployed")

    def close(self) -> None:
        """Write the watermark evidence still queued (the trigger logs) and stop its writers."""
        for stage in self.loaded.values():
            if stage.watermark is not None:
                stage.watermark.close()

    def check_pairing(self, name: str, front_pairing_id: str) -> None:
        """``ModelNotReady`` unless the request's front stage was packed with this back stage.

        A mismatch is the operator's (one tier restarted after a re-pack), never the client's:
        logged once per front id as ``model_pairing_mismatch``, answered as not ready.
        """
        stage = self.get(name)
        back = stage.manifest.pairing_id
        reason = mismatch_reason(name, front_pairing_id or None, back)
        if reason is None:
            return
        if (name, front_pairing_id) not in self._mismatches:
            self._mismatches.add((name, front_pairing_id))
            log.error("model_pairing_mismatch", model=name, reason=reason)
        raise ModelNotReady(f"model {name!r} is not ready (its tiers hold different packs)")

    def pairing_id(self, name: str) -> str:
        """The loaded back stage's pairing id ('' when not loaded or packed without one)."""
        stage = self.loaded.get(name)
        return "" if stage is None else stage.manifest.pairing_id or ""

    def status(self) -> dict[str, str | None]:
        """Model name -> None when ready, else the reason it is not."""
        return {**dict.fromkeys(self.loaded), **self.failed}


def load_store(tier: TierDir, provider: KeyProvider, trigger_dir: Path | None = None) -> ModelStore:
    """Load every model folder under ``tier.models``.

    Watermarked models keep their trigger sets under ``trigger_dir`` (default
    ``private/state/triggers``).
    """
    store = ModelStore()
    triggers = (
        trigger_dir if trigger_dir is not None else default_state_dir(tier.root) / TRIGGER_DIR
    )
    folders = sorted(p for p in tier.models.iterdir() if p.is_dir()) if tier.models.is_dir() else []
    for folder in folders:
        try:
            stage = load_back_stage(folder, provider, triggers)
        except ModelLoadFailure as failure:
            store.failed[folder.name] = failure.reason
            log.error("model_load_failed", model=folder.name, reason=failure.reason)
            continue
        store.loaded[stage.config.name] = stage
        log.info(
            "model_loaded",
            model=stage.config.name,
            parameters=stage.manifest.tiers["private"].parameters,
            watermark=None if stage.watermark is None else stage.watermark.scheme,
            pairing_id=stage.manifest.pairing_id,
        )
    return store


class ModelLoadFailure(Exception):
    """A model folder could not be loaded; ``reason`` names the model and the cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_back_stage(
    folder: Path, provider: KeyProvider, trigger_dir: Path | None = None
) -> BackStage:
    """Decrypt, authenticate and deserialize one back stage (and its watermark key), in memory."""
    name = folder.name
    try:
        config, manifest = read_config(folder), read_manifest(folder)
    except (OSError, ValueError, ValidationError) as error:
        raise ModelLoadFailure(f"model {name!r}: unreadable config or manifest ({error})") from None
    if manifest.stage != "back" or not manifest.encrypted or config.name != name:
        raise ModelLoadFailure(
            f"model {name!r}: the manifest does not describe an encrypted back stage"
        )
    try:
        plaintext = decrypt_bytes((folder / manifest.file).read_bytes(), provider)
    except OSError as error:
        raise ModelLoadFailure(
            f"model {name!r}: cannot read {manifest.file} ({error.strerror})"
        ) from None
    except DecryptionError as error:
        raise ModelLoadFailure(f"model {name!r}: {error.message}") from None
    if hashlib.sha256(plaintext).hexdigest() != manifest.sha256:
        raise ModelLoadFailure(f"model {name!r}: decrypted stage does not match the manifest hash")
    try:
        program = torch.export.load(io.BytesIO(plaintext))
    except Exception as error:  # an authenticated file that still fails: a version mismatch
        raise ModelLoadFailure(
            f"model {name!r}: cannot deserialize the back stage ({type(error).__name__})"
        ) from None
    finally:
        del plaintext
    watermark = _load_watermark(folder, config, provider, trigger_dir)
    return BackStage(
        config=config,
        manifest=manifest,
        module=serving_module(program),
        watermark=watermark,
        activation_profile=_load_activation_profile(folder, manifest, provider),
    )


def _load_activation_profile(
    folder: Path, manifest: StageManifest, provider: KeyProvider
) -> ActivationProfile | None:
    """The sealed reference profile, None when there is none; one that fails fails the model."""
    path = folder / PROFILE_FILE
    if not path.exists():
        return None
    try:
        return load_profile(path, provider, manifest)
    except OSError as error:
        raise ModelLoadFailure(
            f"model {manifest.model!r}: cannot read {PROFILE_FILE} ({error.strerror})"
        ) from None
    except (DecryptionError, ProfileError) as error:
        message = error.message if isinstance(error, DecryptionError) else str(error)
        raise ModelLoadFailure(f"model {manifest.model!r}: activation profile: {message}") from None


def _load_watermark(
    folder: Path, config: ModelConfig, provider: KeyProvider, trigger_dir: Path | None
) -> ModelWatermark | None:
    """The watermark of an enabled model; its key missing or unreadable fails the model."""
    if config.watermark is None or not config.watermark.enabled:
        return None
    try:
        key = load_key(folder / WATERMARK_KEY_FILE, provider)
    except (OSError, WatermarkKeyError) as error:
        raise ModelLoadFailure(f"model {config.name!r}: watermark key: {error}") from None
    except DecryptionError as error:
        raise ModelLoadFailure(f"model {config.name!r}: watermark key: {error.message}") from None
    return ModelWatermark(config, key, trigger_dir)
