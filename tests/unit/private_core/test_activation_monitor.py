"""The activation monitor's statistics, profile file and stream attribution, on synthetic
post-ReLU activations: natural rows are ReLU of a few clustered latent factors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from private_core.activation_monitor import ActivationMonitor, RowScorer, Verdict
from private_core.activation_profile import (
    ActivationProfile,
    ProfileError,
    build_profile,
    channel_groups,
    features_of,
    load_profile,
    save_profile,
)
from private_core.activation_streams import cusum
from private_core.monitor_settings import ActivationMonitorSettings
from protos import inference_pb2
from shared.crypto import DecryptionError
from shared.errors import (
    ACTIVATIONS_REFUSED,
    ActivationsRefused,
    InvalidInput,
    PermissionDenied,
)
from shared.keys import LocalFileKeyProvider
from shared.manifest import DimSpec, StageManifest, TensorSpec
from shared.tensor_codec import from_proto, to_proto

DIM, IDENTITY = 64, ["splitvault-public"]
SPECS = [
    TensorSpec(
        name="act",
        datatype="FP16",
        shape=[DimSpec(name="batch", min=1, max=1024), DIM],
        source="front:act",
    )
]
MIXING = np.random.default_rng(0).standard_normal((8, DIM)).astype(np.float32)
CENTRES = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32) * 2


def natural(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = CENTRES[rng.integers(10, size=n)] + 0.4 * rng.standard_normal((n, 8))
    return np.maximum(latent @ MIXING, 0).astype(np.float16)


def noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 6, (n, DIM)).astype(np.float16)


@pytest.fixture(scope="module")
def profile() -> ActivationProfile:
    return build_profile(natural(1500, 2).astype(np.float32))


def monitor(profile: ActivationProfile | None, **settings: Any) -> ActivationMonitor:
    return ActivationMonitor(
        ActivationMonitorSettings(**settings), {"m": (SPECS, profile)}, CollectorRegistry()
    )


def request(rows: np.ndarray, key: str) -> inference_pb2.InferRequest:
    return inference_pb2.InferRequest(model="m", inputs=[to_proto("act", rows)], key_id=key)


def send(mon: ActivationMonitor, rows: np.ndarray, key: str, batch: int = 16) -> int | None:
    """Send ``rows`` in batches; the samples sent when the first request was refused."""
    for start in range(0, len(rows), batch):
        verdict = mon.check(request(rows[start : start + batch], key), IDENTITY)
        if verdict.error is not None:
            return start + batch
    return None


def test_vectorised_cusum_equals_the_recursion() -> None:
    steps = np.random.default_rng(3).normal(-0.2, 1.0, 500)
    state, peak = 1.5, 1.5
    for step in steps:
        state = max(0.0, state + step)
        peak = max(peak, state)
    assert cusum(1.5, steps) == pytest.approx((state, peak))


@pytest.mark.parametrize("length", [0, 1, 2, 7, 8, 9, 20])
def test_short_and_vectorised_cusum_agree(length: int) -> None:
    steps = np.random.default_rng(length).normal(0.1, 1.0, length)
    state, peak = 0.7, 0.7
    for step in steps:
        state = max(0.0, state + step)
        peak = max(peak, state)
    assert cusum(0.7, steps) == pytest.approx((state, peak))


def test_natural_rows_score_low_and_noise_high(profile: ActivationProfile) -> None:
    scorer = RowScorer(profile, DIM, np.random.default_rng(0), 2.0)
    settings = ActivationMonitorSettings()
    held_out = scorer.evidence(natural(500, 9).astype(np.float32), 1.0, settings)
    crafted = scorer.evidence(noise(500, 9).astype(np.float32), 1.0, settings)
    assert np.quantile(held_out.scores, 0.99) < 1.5
    assert crafted.scores.min() > settings.outlier_score
    assert not held_out.outliers.any() and crafted.outliers.all()


def test_a_noise_stream_is_refused_and_a_natural_one_never_alerted(
    profile: ActivationProfile,
) -> None:
    mon = monitor(profile)
    assert send(mon, natural(5000, 4), "natural") is None
    assert mon.level("m", IDENTITY[0], "natural") == "ok"
    refused_at = send(mon, noise(2000, 5), "noise")
    assert refused_at is not None and refused_at <= 200
    assert mon.level("m", IDENTITY[0]) == "ok"  # one key's noise is that key's alone
    assert send(mon, natural(200, 6), "other") is None


def test_exact_repeats_are_not_a_sweep_but_tiny_steps_are(profile: ActivationProfile) -> None:
    mon = monitor(profile)
    rows = natural(100, 7)
    assert send(mon, np.concatenate([rows] * 20), "repeats") is None
    base = natural(1, 8).astype(np.float32)
    direction = np.random.default_rng(8).standard_normal(DIM).astype(np.float32)
    steps = 0.02 * profile.nn_scale * np.arange(1000)[:, None] / np.linalg.norm(direction)
    sweep = (base + (steps % (0.5 * profile.nn_scale)) * direction).astype(np.float16)
    refused_at = send(mon, sweep, "sweep")
    assert refused_at is not None and refused_at <= 1000


def test_crafted_rows_spread_over_many_key_ids_refuse_the_identity(
    profile: ActivationProfile,
) -> None:
    mon = monitor(profile)
    crafted = noise(2000, 10)
    verdicts = [
        mon.check(request(crafted[i : i + 2], f"k{i}"), IDENTITY) for i in range(0, 2000, 2)
    ]
    refused = [v.error for v in verdicts if v.error is not None]
    assert refused and type(refused[-1]) is PermissionDenied
    assert mon.level("m", IDENTITY[0]) == "refuse"


def test_key_refusal_reads_back_as_a_403_for_that_key(profile: ActivationProfile) -> None:
    from shared.errors import error_from_grpc, grpc_trailers, mapping_for

    mon = monitor(profile)
    send(mon, noise(500, 11), "k")
    verdict = mon.check(request(natural(4, 12), "k"), IDENTITY)
    assert isinstance(verdict.error, ActivationsRefused)
    code = mapping_for(verdict.error).grpc_code
    received = error_from_grpc(code, verdict.error.message, grpc_trailers(verdict.error))
    assert isinstance(received, ActivationsRefused) and mapping_for(received).http_status == 403
    assert received.message == ACTIVATIONS_REFUSED


@pytest.mark.parametrize("action", ["record", "alert"])
def test_record_and_alert_never_refuse(profile: ActivationProfile, action: str) -> None:
    mon = monitor(profile, action=action)
    assert send(mon, noise(500, 13), "k") is None
    assert mon.level("m", IDENTITY[0], "k") == "refuse"


def test_throttle_delays_instead_of_refusing(profile: ActivationProfile) -> None:
    mon = monitor(profile, action="throttle", throttle_delay_s=0.5)
    send(mon, noise(500, 14), "k")
    verdict = mon.check(request(natural(1, 15), "k"), IDENTITY)
    assert verdict.error is None and verdict.delay_s == 0.5


def test_without_a_profile_only_sweeps_are_judged() -> None:
    mon = ActivationMonitor(ActivationMonitorSettings(), {"m": (SPECS, None)}, CollectorRegistry())
    assert send(mon, noise(1000, 16), "noise") is None
    base = natural(1, 17).astype(np.float32)
    sweep = (base * (1 + 0.001 * np.arange(400)[:, None])).astype(np.float16)
    assert send(mon, sweep, "sweep") is not None


def _manifest(model: str = "m", sha: str = "ab" * 32) -> StageManifest:
    return StageManifest(
        model=model,
        stage="back",
        file="back.pt2.enc",
        encrypted=True,
        sha256=sha,
        inputs=SPECS,
        outputs=[],
        tiers={},
        torch_version="x",
    )


def test_profile_is_sealed_and_bound_to_its_model(
    profile: ActivationProfile, tmp_path: Path
) -> None:
    provider = LocalFileKeyProvider.from_bytes(bytes(32))
    path = tmp_path / "activations.npz.enc"
    save_profile(profile, path, provider, model="m", back_sha256="ab" * 32)
    loaded = load_profile(path, provider, _manifest())
    assert np.array_equal(loaded.bank, profile.bank) and loaded.nn_scale == profile.nn_scale
    with pytest.raises(ProfileError):
        load_profile(path, provider, _manifest(model="other"))
    with pytest.raises(ProfileError):
        load_profile(path, provider, _manifest(sha="cd" * 32))
    with pytest.raises(DecryptionError):
        load_profile(path, LocalFileKeyProvider.from_bytes(bytes([1]) * 32), _manifest())
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DecryptionError):
        load_profile(path, provider, _manifest())


def _mixed_requests(count: int) -> list[inference_pb2.InferRequest]:
    """Natural requests of 1 to 4 rows over three keys, every seventh one uniform noise."""
    rng = np.random.default_rng(20)
    return [
        request((noise if i % 7 == 0 else natural)(int(rng.integers(1, 5)), 100 + i), f"k{i % 3}")
        for i in range(count)
    ]


def test_a_group_is_judged_as_its_requests_one_by_one(profile: ActivationProfile) -> None:
    one_by_one, grouped = monitor(profile), monitor(profile)
    grouped._models["m"].scorer = one_by_one._models["m"].scorer  # the same secret projection
    calls = [(r, IDENTITY) for r in _mixed_requests(400)]
    expected = [one_by_one.check(r, who) for r, who in calls]
    sizes, got, start = np.random.default_rng(21).integers(1, 13, 400), [], 0
    for size in sizes:
        got += grouped.check_many(calls[start : start + int(size)])
        start += int(size)
        if start >= len(calls):
            break
    assert [type(v.error) if isinstance(v, Verdict) else v for v in got] == [
        type(v.error) for v in expected
    ]
    assert any(v.error is not None for v in expected)  # the stream was refused on the way
    for scope in [None, "k0", "k1", "k2"]:
        assert grouped.level("m", IDENTITY[0], scope) == one_by_one.level("m", IDENTITY[0], scope)
    table_a, table_b = one_by_one._models["m"].keys, grouped._models["m"].keys
    for key in [(IDENTITY[0], f"k{i}") for i in range(3)]:
        stream_a, stream_b = table_a.peek(key), table_b.peek(key)
        assert stream_a is not None and stream_b is not None
        assert stream_b.reason() == stream_a.reason()


def test_a_bad_request_fails_alone_in_its_group(profile: ActivationProfile) -> None:
    mon = monitor(profile)
    bad = inference_pb2.InferRequest(model="m", inputs=[to_proto("act", natural(2, 30)[:, :5])])
    calls = [request(natural(2, 31), "a"), bad, request(natural(3, 32), "b")]
    first, failed, last = mon.check_many([(call, IDENTITY) for call in calls])
    assert isinstance(first, Verdict) and first.error is None
    assert isinstance(last, Verdict) and last.error is None
    assert isinstance(failed, InvalidInput)


def test_decoded_arrays_are_judged_as_the_request_bytes(profile: ActivationProfile) -> None:
    """The runner hands the monitor the arrays it decoded; the verdicts are the same."""
    from_bytes, from_arrays = monitor(profile), monitor(profile)
    from_arrays._models["m"].scorer = from_bytes._models["m"].scorer
    calls = [(r, IDENTITY) for r in _mixed_requests(400)]
    arrays = [{"act": from_proto(r.inputs[0])} for r, _ in calls]
    expected = [type(from_bytes.check(r, who).error) for r, who in calls]
    got = from_arrays.check_many(calls, arrays)
    assert [type(v.error) if isinstance(v, Verdict) else v for v in got] == expected
    assert len(set(expected)) > 1  # refused on the way


def test_sequence_features_pool_over_the_attention_mask() -> None:
    batch, seq = DimSpec(name="batch", min=1, max=8), DimSpec(name="seq", min=1, max=64)
    specs = [
        TensorSpec(name="hidden", datatype="FP16", shape=[batch, seq, 4], source="front:h"),
        TensorSpec(name="mask", datatype="INT64", shape=[batch, seq], source="request:mask"),
    ]
    hidden = np.random.default_rng(33).standard_normal((1, 5, 4)).astype(np.float16)
    padded = np.concatenate([hidden, np.full((1, 3, 4), 9.0, np.float16)], axis=1)
    mask = np.array([[1] * 5 + [0] * 3])
    alone = features_of({"hidden": hidden, "mask": np.ones((1, 5), np.int64)}, specs)
    assert np.allclose(features_of({"hidden": padded, "mask": mask}, specs), alone, atol=1e-6)
    assert not np.allclose(features_of({"hidden": padded}, specs[:1]), alone, atol=1e-3)


CONV_SPECS = [
    TensorSpec(
        name="act",
        datatype="FP16",
        shape=[DimSpec(name="batch", min=1, max=1024), 4, 5, 5],
        source="front:act",
    )
]


def test_zero_pattern_profile_round_trips_and_needs_channels(tmp_path: Path) -> None:
    """(tests/unit/private_core/test_monitor_batches.py judges real digits activations.)"""
    assert channel_groups(CONV_SPECS) == 4 and channel_groups(SPECS) == 0
    rows = np.maximum(np.random.default_rng(3).standard_normal((600, 100)), 0)
    built = build_profile(rows.astype(np.float32), channels=4)
    assert built.channels == 4 and built.pattern_active
    assert not build_profile(rows.astype(np.float32)).pattern_active
    provider = LocalFileKeyProvider.from_bytes(bytes(32))
    path = tmp_path / "activations.npz.enc"
    save_profile(built, path, provider, model="m", back_sha256="ab" * 32)
    manifest = _manifest().model_copy(update={"inputs": CONV_SPECS})
    loaded = load_profile(path, provider, manifest)
    assert loaded.channels == 4
    np.testing.assert_array_equal(loaded.pattern_inverse, built.pattern_inverse)
