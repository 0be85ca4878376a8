"""The packed-model schema: config checks and stage manifests that survive a JSON round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    DimSpec,
    LabelPolicy,
    ModelConfig,
    RoundingPolicy,
    StageManifest,
    TensorSpec,
    TierCount,
    TopKPolicy,
    read_config,
    read_manifest,
    write_json,
)

BATCH = DimSpec(name="batch", min=1, max=256)
SEQ = DimSpec(name="seq", min=1, max=512)


def _config(**overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "name": "digits",
        "split": "features.1",
        "task": "classification",
        "policy": TopKPolicy(k=3),
    }
    return ModelConfig(**(fields | overrides))


def _manifest() -> StageManifest:
    return StageManifest(
        model="minilm",
        stage="back",
        file="back.pt2.enc",
        encrypted=True,
        sha256="ab" * 32,
        inputs=[
            TensorSpec(
                name="layer_norm_4",
                datatype="FP32",
                shape=[BATCH, SEQ, 384],
                source="front:layer_norm_4",
            ),
            TensorSpec(
                name="attention_mask",
                datatype="INT64",
                shape=[BATCH, SEQ],
                source="request:attention_mask",
                value_range=(0, 1),
            ),
        ],
        outputs=[TensorSpec(name="out", datatype="FP32", shape=[BATCH, 384])],
        tiers={
            "public": TierCount(parameters=10, bytes=40),
            "private": TierCount(parameters=20, bytes=80),
        },
        torch_version="2.13.0",
        forward_inputs=["attention_mask"],
    )


@pytest.mark.parametrize(
    ("task", "policy"),
    [
        ("classification", TopKPolicy()),
        ("classification", LabelPolicy()),
        ("embedding", RoundingPolicy()),
    ],
)
def test_policies_that_fit_the_task(task: str, policy: Any) -> None:
    config = _config(task=task, policy=policy)
    assert config.policy == policy


@pytest.mark.parametrize(
    ("task", "policy"),
    [
        ("embedding", TopKPolicy()),
        ("embedding", LabelPolicy()),
        ("classification", RoundingPolicy()),
    ],
)
def test_policy_that_does_not_fit_the_task_is_refused(task: str, policy: Any) -> None:
    with pytest.raises(ValidationError, match="does not fit task"):
        _config(task=task, policy=policy)


@pytest.mark.parametrize(
    "name",
    ["", "Digits", "-digits", ".hidden", "my model", "a/b", "../x", "x" * 65, "naïve", "a$b"],
)
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="name"):
        _config(name=name)


@pytest.mark.parametrize("name", ["digits", "digits-label", "minilm_v2", "m.1", "0", "x" * 64])
def test_good_model_names(name: str) -> None:
    assert _config(name=name).name == name


@pytest.mark.parametrize(
    "overrides",
    [
        {"transport_datatype": "FP8"},
        {"transport_datatype": "INT8"},
        {"task": "regression"},
        {"max_batch_size": 0},
        {"max_batch_size": 5000},
        {"policy": {"kind": "topk", "k": 0}},
        {"policy": {"kind": "topk", "k": 101}},
        {"policy": {"kind": "topk", "decimals": 9}},
        {"policy": {"kind": "logits"}},
        {"secret": "x"},  # unknown fields are refused, not ignored
    ],
)
def test_bad_config_fields_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _config(**overrides)


def test_config_is_frozen() -> None:
    config = _config()
    with pytest.raises(ValidationError):
        config.name = "other"


def test_policy_is_read_by_its_kind() -> None:
    config = ModelConfig.model_validate(
        {"name": "m", "split": "s", "task": "classification", "policy": {"kind": "label"}}
    )
    assert isinstance(config.policy, LabelPolicy)
    embedding = ModelConfig.model_validate(
        {
            "name": "e",
            "split": "s",
            "task": "embedding",
            "policy": {"kind": "rounding", "decimals": 5},
        }
    )
    assert embedding.policy == RoundingPolicy(decimals=5)


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    config = _config(
        labels=["zero", "one"],
        transport_datatype="FP32",
        max_batch_size=8,
        policy=TopKPolicy(k=2, decimals=6),
    )
    write_json(tmp_path / CONFIG_FILE, config)
    assert read_config(tmp_path) == config
    assert ModelConfig.model_validate_json(config.model_dump_json()) == config


def test_stage_manifest_round_trips_through_json(tmp_path: Path) -> None:
    manifest = _manifest()
    write_json(tmp_path / MANIFEST_FILE, manifest)
    read = read_manifest(tmp_path)
    assert read == manifest
    assert isinstance(read.inputs[0].shape[0], DimSpec)
    assert read.inputs[0].shape[2] == 384
    assert read.inputs[1].value_range == (0, 1)
    assert read.tiers["private"].parameters == 20
    assert StageManifest.model_validate_json(manifest.model_dump_json()) == manifest


@pytest.mark.parametrize(
    "overrides",
    [{"stage": "middle"}, {"tiers": {"cloud": {"parameters": 1, "bytes": 1}}}, {"extra": 1}],
)
def test_bad_stage_manifest_is_refused(overrides: dict[str, Any]) -> None:
    data = _manifest().model_dump() | overrides
    with pytest.raises(ValidationError):
        StageManifest.model_validate(data)


@pytest.mark.parametrize(
    "dim", [{"name": "b", "min": -1, "max": 4}, {"name": "b", "min": 0, "max": 0}]
)
def test_bad_dim_ranges_are_refused(dim: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DimSpec.model_validate(dim)
