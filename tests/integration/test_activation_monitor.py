"""The private tier's activation monitor against a compromised public host (issue 13, item 2).

A module-scoped deployment of the digits model runs the private tier with the
monitor refusing; each test calls it directly over mutual TLS with the public tier's own client
certificate, as whoever owns the public host can, under an API key id of its own. A public tier
in front of it shows how a key the monitor refused is answered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from protos import inference_pb2, inference_pb2_grpc
from shared.errors import ACTIVATIONS_REFUSED
from shared.keys import LocalFileKeyProvider
from shared.layout import FRONT_FILE, PRIVATE_IDENTITY, DeployLayout
from shared.manifest import RoundingPolicy, TopKPolicy, read_manifest
from shared.tensor_codec import to_proto
from splitvault.assess.data import docstring_sentences
from splitvault.demo import digits, minilm
from splitvault.deploy import init_deployment
from splitvault.packing.pack import pack_spec
from splitvault.packing.spec import ModelSpec
from tests.conftest import DigitsFixture, issue_key
from tests.support.deployments import pairing_id
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import THREADS, https, image_request, poll, tier_env

pytestmark = pytest.mark.slow

MODEL, BATCH = "digits", 16
ENV = {**THREADS, "SPLITVAULT_PRIVATE_METRICS_PORT": "0"}  # the monitor at its default: refuse


@dataclass
class Attacker:
    """The private tier, reached with the public tier's certificate, and the plaintext front."""

    stub: inference_pb2_grpc.PrivateInferenceStub
    front: torch.nn.Module
    input_name: str
    private: TierProcess
    layout: DeployLayout

    def activations(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            (output,) = self.front(torch.from_numpy(images))
            return np.asarray(output.numpy(), dtype=np.float16)

    def send(self, rows: np.ndarray, key: str) -> int | None:
        """``rows`` in requests of ``BATCH``; samples sent when the first was refused."""
        for start in range(0, len(rows), BATCH):
            part = rows[start : start + BATCH]
            request = inference_pb2.InferRequest(
                model=MODEL,
                inputs=[to_proto(self.input_name, part)],
                key_id=key,
                pairing_id=pairing_id(self.layout, MODEL),
            )
            code = _code(self.stub.Infer, request)
            if code is not None:
                assert code == grpc.StatusCode.PERMISSION_DENIED, code
                return start + len(part)
        return None

    def alerts(self, key: str) -> list[dict[str, Any]]:
        return [
            event
            for event in self.private.events()
            if event.get("event") == "private_monitor_alert" and event.get("key_id_asserted") == key
        ]


def _code(call: Callable[..., object], request: object) -> grpc.StatusCode | None:
    """The status code ``call(request)`` failed with; None when it succeeded."""
    try:
        call(request, timeout=30)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return None


@pytest.fixture(scope="module")
def attacker(
    digits_model: DigitsFixture, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Attacker]:
    layout = init_deployment(tmp_path_factory.mktemp("actmon") / "d")
    provider = LocalFileKeyProvider.load(layout.kek)
    pack_spec(
        digits_model.spec,
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=provider,
        policy=TopKPolicy(k=3),
        show_progress=False,
    )
    private = start_private(layout.root, env=ENV)
    tls = layout.public.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.public.ca_cert.read_bytes(),
        private_key=(tls / "client.key").read_bytes(),
        certificate_chain=(tls / "client.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", PRIVATE_IDENTITY)]
    front = torch.export.load(str(layout.public.model(MODEL) / FRONT_FILE)).module()
    (spec,) = read_manifest(layout.private.model(MODEL)).inputs
    try:
        with grpc.secure_channel(f"127.0.0.1:{private.port}", credentials, options=options) as ch:
            yield Attacker(
                inference_pb2_grpc.PrivateInferenceStub(ch), front, spec.name, private, layout
            )
    finally:
        private.stop()


def _uniform(attacker: Attacker, n: int, seed: int) -> np.ndarray:
    shape = attacker.activations(np.zeros((1, 1, 8, 8), np.float32)).shape[1:]
    return np.random.default_rng(seed).uniform(0, 4, (n, *shape)).astype(np.float16)


def test_the_sealed_profile_is_loaded(attacker: Attacker) -> None:
    assert (attacker.layout.private.model(MODEL) / "activations.npz.enc").is_file()
    assert not any(
        e.get("event") == "private_monitor_without_profile" for e in attacker.private.events()
    )


def test_uniform_noise_is_alerted_within_200_and_refused_within_1000(attacker: Attacker) -> None:
    refused_at = attacker.send(_uniform(attacker, 2000, 1), "noise")
    assert refused_at is not None and refused_at <= 1000
    poll(lambda: bool(attacker.alerts("noise")), "an alert for the noise stream")
    (alert, *_) = attacker.alerts("noise")
    assert alert["samples"] <= 200, alert
    # Each level change is logged with the stream's level (the log record's own is "warning").
    assert "refuse" in [event["stream_level"] for event in attacker.alerts("noise")]
    # Refused for good: natural activations under that key id are refused too.
    natural = attacker.activations(np.asarray(digits.load_data().test_x[:BATCH]))
    assert attacker.send(natural, "noise") == BATCH


def test_natural_activations_of_held_out_digits_are_never_alerted(attacker: Attacker) -> None:
    held_out = digits.load_data().test_x
    rows = np.concatenate([attacker.activations(held_out)] * 3)
    assert attacker.send(rows, "natural") is None
    assert attacker.alerts("natural") == []


def test_a_mixed_stream_with_ten_percent_noise_is_alerted(attacker: Attacker) -> None:
    held_out = digits.load_data().test_x
    rows = np.concatenate([attacker.activations(held_out)] * 4)
    crafted = np.random.default_rng(2).random(len(rows)) < 0.1
    rows[crafted] = _uniform(attacker, int(crafted.sum()), 3)
    attacker.send(rows, "mixed")
    poll(lambda: bool(attacker.alerts("mixed")), "an alert for the mixed stream")
    (alert, *_) = attacker.alerts("mixed")
    assert alert["samples"] <= 200, alert


def test_a_perturbation_sweep_is_alerted(attacker: Attacker) -> None:
    base = attacker.activations(np.asarray(digits.load_data().test_x[:8])).astype(np.float32)
    rng = np.random.default_rng(4)
    lines = []
    for row in base:  # 64 steps along a random direction from each of 8 natural activations
        direction = rng.standard_normal(row.shape).astype(np.float32)
        direction *= 0.05 / np.linalg.norm(direction)
        lines.append(row + np.arange(64)[:, None, None, None] * direction)
    refused_at = attacker.send(np.concatenate(lines).astype(np.float16), "sweep")
    assert refused_at is not None and refused_at <= 512
    poll(lambda: bool(attacker.alerts("sweep")), "an alert for the sweep")


def _full_covariance(attacker: Attacker, n: int, seed: int) -> np.ndarray:
    """Gaussian rows with the mean and full covariance of the training digits' activations,
    clipped at 0 like a ReLU: first and second moments match natural rows."""
    reference = attacker.activations(np.asarray(digits.load_data().train_x[:1024]))
    flat = reference.reshape(len(reference), -1).astype(np.float64)
    rng = np.random.default_rng(seed)
    rows = rng.multivariate_normal(flat.mean(0), np.cov(flat.T), n, method="eigh")
    return np.maximum(rows, 0).reshape(n, *reference.shape[1:]).astype(np.float16)


def test_full_covariance_noise_is_alerted_within_200_and_refused_within_1000(
    attacker: Attacker,
) -> None:
    refused_at = attacker.send(_full_covariance(attacker, 1000, 6), "full-cov")
    assert refused_at is not None and refused_at <= 1000
    poll(lambda: bool(attacker.alerts("full-cov")), "an alert for the full-covariance stream")
    (alert, *_) = attacker.alerts("full-cov")
    assert alert["samples"] <= 200, alert


def test_concurrent_natural_requests_are_answered_next_to_refused_ones(
    attacker: Attacker,
) -> None:
    """Crafted and natural requests in flight together (they share batches): each crafted
    one is refused, every natural one answered."""
    assert attacker.send(_full_covariance(attacker, 1000, 7), "crafted") is not None
    natural = attacker.activations(np.asarray(digits.load_data().test_x[:64]))
    crafted = _full_covariance(attacker, 64, 8)
    calls = []
    for i in range(64):
        calls.append((natural[i : i + 1], f"customer-{i % 4}"))
        calls.append((crafted[i : i + 1], "crafted"))

    def one(call: tuple[np.ndarray, str]) -> grpc.StatusCode | None:
        rows, key = call
        request = inference_pb2.InferRequest(
            model=MODEL,
            inputs=[to_proto(attacker.input_name, rows)],
            key_id=key,
            pairing_id=pairing_id(attacker.layout, MODEL),
        )
        return _code(attacker.stub.Infer, request)

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, calls))
    assert codes[0::2] == [None] * 64
    assert codes[1::2] == [grpc.StatusCode.PERMISSION_DENIED] * 64
    assert all(attacker.alerts(f"customer-{i}") == [] for i in range(4))


def test_the_public_tier_answers_a_refused_key_with_403(
    attacker: Attacker, digits_model: DigitsFixture
) -> None:
    key = issue_key(attacker.layout, "noisy")
    public = start_public(attacker.layout.root, attacker.private.port, env=tier_env())
    try:
        noise = np.random.default_rng(5).uniform(0, 1, (BATCH, 1, 8, 8)).astype(np.float32)
        with https(attacker.layout, public.port, key) as http:
            replies = [
                http.post(f"/v2/models/{MODEL}/infer", json=image_request(noise)) for _ in range(8)
            ]
    finally:
        public.stop()
    refused = [r for r in replies if r.status_code != 200]
    assert refused, "noise images were never refused"
    assert {r.status_code for r in refused} == {403}
    assert refused[-1].json() == {"error": ACTIVATIONS_REFUSED}


def test_minilm_is_profiled_and_natural_sentences_are_never_alerted(
    minilm_spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """MiniLM packs with its reference sentences, so its private tier judges it with a profile;
    300 held-out sentences, one a request as the public tier sends them, raise no alert."""
    layout = init_deployment(tmp_path_factory.mktemp("actmon-minilm") / "d")
    provider = LocalFileKeyProvider.load(layout.kek)
    pack_spec(
        minilm_spec,
        name="minilm",
        split=minilm.SPLIT,
        layout=layout,
        provider=provider,
        policy=RoundingPolicy(decimals=5),
        show_progress=False,
    )
    assert (layout.private.model("minilm") / "activations.npz.enc").is_file()
    hidden, mask = (spec.name for spec in read_manifest(layout.private.model("minilm")).inputs)
    front = torch.export.load(str(layout.public.model("minilm") / FRONT_FILE)).module()
    reference = set(minilm.reference_sentences())
    sentences = [s for s in docstring_sentences() if s not in reference][:300]
    tokenizer = minilm.load_tokenizer()
    private = start_private(layout.root, env=ENV)
    try:
        stub = _stub(layout, private.port)
        for i, sentence in enumerate(sentences):
            tokens = tokenizer([sentence], return_tensors="pt")
            with torch.inference_mode():
                (out,) = front(tokens["input_ids"], tokens["attention_mask"])
            request = inference_pb2.InferRequest(
                model="minilm",
                inputs=[
                    to_proto(hidden, out.numpy().astype(np.float16)),
                    to_proto(mask, tokens["attention_mask"].numpy()),
                ],
                key_id=f"reader-{i % 3}",
                pairing_id=pairing_id(layout, "minilm"),
            )
            assert _code(stub.Infer, request) is None, sentence
        events = private.events()
    finally:
        private.stop()
    names = {event.get("event") for event in events}
    assert "private_monitor_without_profile" not in names
    assert "private_monitor_alert" not in names


def _stub(layout: DeployLayout, port: int) -> inference_pb2_grpc.PrivateInferenceStub:
    """The private tier over mutual TLS with the public tier's client certificate."""
    tls = layout.public.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.public.ca_cert.read_bytes(),
        private_key=(tls / "client.key").read_bytes(),
        certificate_chain=(tls / "client.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", PRIVATE_IDENTITY)]
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)
    return inference_pb2_grpc.PrivateInferenceStub(channel)
