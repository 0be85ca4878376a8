"""The activation monitor on the real digits split: the packed profile's zero pattern catches
noise with the reference's full covariance, and a batch's requests are judged in the batch
worker, one pass, each refused alone."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from private_core.activation_monitor import ActivationMonitor, monitored_models
from private_core.model_store import BackStage, load_back_stage
from private_core.monitor_settings import ActivationMonitorSettings
from private_core.policy import INDICES, SCORES
from private_core.runner import BackRequest, Screening, plan_batching, run_batch
from protos import inference_pb2
from public_api.front import FrontStage, load_front_stages
from shared.errors import ActivationsRefused
from tests.conftest import Deployment, DigitsFixture

IDENTITY = ("splitvault-public",)
BATCH = 16


@pytest.fixture(scope="module")
def stages(deployment: Deployment) -> tuple[FrontStage, BackStage]:
    front = load_front_stages(deployment.layout.public)["digits"]
    back = load_back_stage(deployment.layout.private.model("digits"), deployment.provider)
    return front, back


def activations(front: FrontStage, images: np.ndarray) -> np.ndarray:
    """What the private tier receives for ``images``: the front's FP16 activations."""
    parts = []
    with torch.inference_mode():
        for start in range(0, len(images), 1024):
            (out,) = front.module(torch.from_numpy(images[start : start + 1024]))
            parts.append(out.numpy())
    return np.concatenate(parts).astype(np.float16)


def full_covariance_noise(reference: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Gaussian rows with the reference's mean and full covariance, clipped at 0 like a ReLU."""
    flat = reference.reshape(len(reference), -1).astype(np.float64)
    rng = np.random.default_rng(seed)
    rows = rng.multivariate_normal(flat.mean(0), np.cov(flat.T), n, method="eigh")
    return np.maximum(rows, 0).reshape(n, *reference.shape[1:]).astype(np.float16)


def job(back: BackStage, rows: np.ndarray, key: str) -> BackRequest:
    (spec,) = back.manifest.inputs
    screening = Screening(inference_pb2.InferRequest(model="digits", key_id=key), IDENTITY)
    return BackRequest({spec.name: rows}, {"batch": len(rows)}, len(rows), 3, None, screening)


def monitor_of(back: BackStage, **changes: Any) -> ActivationMonitor:
    models = monitored_models({"digits": back})
    if changes:
        specs, profile = models["digits"]
        models["digits"] = (specs, dataclasses.replace(profile, **changes))
    return ActivationMonitor(ActivationMonitorSettings(), models, CollectorRegistry())


def refused_after(
    back: BackStage, mon: ActivationMonitor, rows: np.ndarray, key: str
) -> int | None:
    """Rows sent (in requests of ``BATCH``) when the first one was refused; None: never."""
    plan = plan_batching(back, pad=True)
    for start in range(0, len(rows), BATCH):
        (answer,) = run_batch(back, plan, [job(back, rows[start : start + BATCH], key)], mon)
        if isinstance(answer, Exception):
            assert isinstance(answer, ActivationsRefused)
            return start + BATCH
    return None


def test_full_covariance_noise_is_refused_by_its_zero_pattern(
    stages: tuple[FrontStage, BackStage], digits_model: DigitsFixture
) -> None:
    front, back = stages
    assert back.activation_profile is not None and back.activation_profile.pattern_active
    reference = activations(front, digits_model.data.train_x)
    noise = full_covariance_noise(reference, 320, seed=1)
    held_out = activations(front, digits_model.data.test_x)
    mon = monitor_of(back)
    assert refused_after(back, mon, noise, "thief") == BATCH  # its first request is refused
    assert refused_after(back, mon, np.concatenate([held_out] * 3), "customer") is None
    assert mon.level("digits", IDENTITY[0], "customer") == "ok"
    # Without the zero pattern (a version 1 profile), the same rows go on much longer.
    moments_only = monitor_of(back, channels=0)
    assert (refused_after(back, moments_only, noise, "thief") or len(noise)) >= 4 * BATCH


def test_a_crafted_request_in_a_batch_is_refused_alone(
    stages: tuple[FrontStage, BackStage], digits_model: DigitsFixture
) -> None:
    front, back = stages
    plan = plan_batching(back, pad=True)
    reference = activations(front, digits_model.data.train_x)
    noise = full_covariance_noise(reference, 64, seed=2)
    natural = activations(front, digits_model.data.test_x[:6])
    mon = monitor_of(back)
    assert refused_after(back, mon, noise[:32], "thief") == BATCH
    batch = [
        job(back, natural[:2], "alice"),
        job(back, noise[32:35], "thief"),  # judged with its neighbours, refused alone
        job(back, natural[2:3], "bob"),
        job(back, noise[35:43], "mallory"),  # a fresh key: alerted, its 8 rows answered
        job(back, natural[3:6], "alice"),
    ]
    answers = run_batch(back, plan, batch, mon)
    assert isinstance(answers[1], ActivationsRefused)
    for index in (0, 2, 3, 4):
        answer, (alone,) = answers[index], run_batch(back, plan, [batch[index]])
        assert not isinstance(answer, Exception) and not isinstance(alone, Exception)
        np.testing.assert_array_equal(answer[INDICES], alone[INDICES])
        np.testing.assert_allclose(answer[SCORES], alone[SCORES], atol=1e-4 + 1e-12)
    assert mon.level("digits", IDENTITY[0], "mallory") == "alert"
    assert mon.level("digits", IDENTITY[0], "alice") == "ok"
    assert mon.level("digits", IDENTITY[0], "bob") == "ok"


def test_a_throttled_request_is_answered_and_carries_its_delay(
    stages: tuple[FrontStage, BackStage], digits_model: DigitsFixture
) -> None:
    """``throttle``: the batch worker answers, and leaves the delay for the runner to wait."""
    front, back = stages
    noise = full_covariance_noise(activations(front, digits_model.data.train_x), 48, seed=3)
    settings = ActivationMonitorSettings(action="throttle", throttle_delay_s=2.5)
    mon = ActivationMonitor(settings, monitored_models({"digits": back}), CollectorRegistry())
    plan = plan_batching(back, pad=True)
    jobs = [job(back, noise[start:stop], "thief") for start, stop in ((0, 4), (4, 20), (20, 36))]
    answers = [run_batch(back, plan, [one], mon)[0] for one in jobs]
    assert not any(isinstance(answer, Exception) for answer in answers)
    delays = [one.screening.delay_s for one in jobs if one.screening is not None]
    assert delays == [0.0, 2.5, 2.5]
    assert mon.level("digits", IDENTITY[0], "thief") == "refuse"
