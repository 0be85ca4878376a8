"""The public tier's folder holds no private weight, key or CA secret; the private folder no key.

Every back-stage tensor is recovered by decrypting ``back.pt2.enc`` with the deployment's KEK,
then its raw bytes are searched for in every file under ``public/``. The same search finds every
front-stage tensor in ``front.pt2``: that positive control shows the method would catch a leak.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.crypto import decrypt_bytes
from shared.layout import BACK_FILE, FRONT_FILE
from tests.conftest import Deployment, DigitsFixture

MODELS = ("digits", "digits-label", "nested", "minilm")
MIN_BYTES = 16  # shorter tensors (scalars, tiny biases) could match by chance
WHOLE_UP_TO = 256  # longer tensors are searched by a window from their middle
WINDOW = 64


@dataclass(frozen=True)
class Needle:
    """The bytes to look for, and where they came from."""

    where: str
    data: bytes


def _files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().contiguous().numpy().tobytes())


def _needle(where: str, tensor: torch.Tensor) -> Needle | None:
    """Whole bytes of a small tensor or a middle window of a big one; None when uninformative.

    Tensors under 16 bytes are skipped, and so are constant-filled ones (a fresh LayerNorm's
    ones and zeros): they hold no secret and legitimately appear in both stages.
    """
    flat = tensor.detach().flatten()
    raw = _tensor_bytes(flat)
    if len(raw) < MIN_BYTES or bool((flat == flat[0]).all()):
        return None
    if len(raw) <= WHOLE_UP_TO:
        return Needle(where, raw)
    middle = len(raw) // 2
    return Needle(where, raw[middle - WINDOW // 2 : middle + WINDOW // 2])


def _program_needles(program: torch.export.ExportedProgram, label: str) -> list[Needle]:
    """Needles for every tensor of the program: parameters, buffers and lifted constants."""
    tensors = {**program.state_dict, **program.constants}
    needles = [
        _needle(f"{label}:{name}", value)
        for name, value in tensors.items()
        if isinstance(value, torch.Tensor)
    ]
    return [needle for needle in needles if needle is not None]


def _back_program(deployment: Deployment, model: str) -> torch.export.ExportedProgram:
    encrypted = (deployment.layout.private.model(model) / BACK_FILE).read_bytes()
    return torch.export.load(io.BytesIO(decrypt_bytes(encrypted, deployment.provider)))


@pytest.fixture(scope="module")
def back_needles(deployment: Deployment) -> dict[str, list[Needle]]:
    """Model name -> needles of every informative back-stage tensor."""
    return {m: _program_needles(_back_program(deployment, m), f"{m}/back") for m in MODELS}


@pytest.fixture(scope="module")
def public_files(deployment: Deployment) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in _files(deployment.layout.public.root)}


@pytest.fixture(scope="module")
def private_files(deployment: Deployment) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in _files(deployment.layout.private.root)}


def _found_in(needle: Needle, files: dict[Path, bytes]) -> list[Path]:
    return [path for path, data in files.items() if needle.data in data]


def _secrets(deployment: Deployment) -> dict[str, bytes]:
    """The KEK (raw and base64), the CA key PEM, its base64 lines and its raw private scalar."""
    kek_text = deployment.layout.kek.read_bytes().strip()
    kek = base64.b64decode(kek_text, validate=True)
    ca_pem = (deployment.layout.ca / "ca.key").read_bytes()
    ca_key = serialization.load_pem_private_key(ca_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    secrets = {"KEK (raw)": kek, "KEK (base64)": kek_text, "CA key PEM": ca_pem.strip()}
    secrets["CA private scalar"] = ca_key.private_numbers().private_value.to_bytes(32, "big")
    body = [line for line in ca_pem.splitlines() if line and not line.startswith(b"-----")]
    secrets |= {f"CA key PEM line {i}": line for i, line in enumerate(body) if len(line) >= 40}
    return secrets


def test_every_model_has_back_tensors_to_search_for(back_needles: dict[str, list[Needle]]) -> None:
    for model, needles in back_needles.items():
        assert len(needles) >= 2, f"{model}: too few informative back-stage tensors"


def test_positive_control_front_tensors_are_found_in_front_file(
    deployment: Deployment, public_files: dict[Path, bytes]
) -> None:
    for model in MODELS:
        front_path = deployment.layout.public.model(model) / FRONT_FILE
        with front_path.open("rb") as front:  # closed here, not whenever torch lets go of it
            program = torch.export.load(front)
        needles = _program_needles(program, f"{model}/front")
        assert needles, f"{model}: the front stage has no tensor to control with"
        for needle in needles:
            assert front_path in _found_in(needle, public_files), needle.where


def test_no_back_stage_tensor_is_in_any_public_file(
    back_needles: dict[str, list[Needle]], public_files: dict[Path, bytes]
) -> None:
    leaks = [
        f"{needle.where} in {[p.name for p in found]}"
        for needles in back_needles.values()
        for needle in needles
        if (found := _found_in(needle, public_files))
    ]
    assert not leaks


def test_encrypted_back_stage_holds_no_plaintext_tensor(
    deployment: Deployment, back_needles: dict[str, list[Needle]]
) -> None:
    for model, needles in back_needles.items():
        encrypted = (deployment.layout.private.model(model) / BACK_FILE).read_bytes()
        windows = [n for n in needles if len(n.data) == WINDOW]
        assert windows, f"{model}: no big tensor to look for"
        assert not [n.where for n in needles if n.data in encrypted]


def test_no_key_material_in_either_tier_folder(
    deployment: Deployment, public_files: dict[Path, bytes], private_files: dict[Path, bytes]
) -> None:
    secrets = _secrets(deployment)
    everything = {**public_files, **private_files}
    kek_file = deployment.layout.kek.read_bytes()
    assert secrets["KEK (base64)"] in kek_file  # the needles are the real secrets
    leaks = [
        f"{what} in {path.relative_to(deployment.root)}"
        for what, secret in secrets.items()
        for path, data in everything.items()
        if secret in data
    ]
    assert not leaks


def test_files_are_in_the_right_tier(deployment: Deployment) -> None:
    public = _files(deployment.layout.public.root)
    private = _files(deployment.layout.private.root)
    assert not [p for p in public if p.name.endswith(".enc")]
    assert not [p for p in private if p.name == FRONT_FILE or p.suffix == ".pt2"]
    for model in MODELS:
        assert (deployment.layout.public.model(model) / FRONT_FILE).is_file()
        assert (deployment.layout.private.model(model) / BACK_FILE).is_file()
        assert not (deployment.layout.public.model(model) / BACK_FILE).exists()


def test_front_program_does_not_ship_the_example_inputs(
    deployment: Deployment, digits_model: DigitsFixture
) -> None:
    example = digits_model.spec.example_inputs["image"]
    rows = [_tensor_bytes(row) for row in example]
    for model in ("digits", "digits-label"):
        front = (deployment.layout.public.model(model) / FRONT_FILE).read_bytes()
        assert _tensor_bytes(example) not in front
        assert not [i for i, row in enumerate(rows) if row in front], model
