"""``pack`` draws the watermark key bounded in benign cost when the spec carries labelled
benign data, and keeps the old rule (the first key drawn, unchecked) when it does not."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from private_core.watermark.benign import BOUND, MAX_DRAWS, benign_cost
from private_core.watermark.keys import CHOICE_FILE, WATERMARK_KEY_FILE, load_key
from shared.keys import LocalFileKeyProvider
from shared.manifest import TopKPolicy, read_config
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.packing.pack import pack_spec
from splitvault.packing.spec import ModelSpec
from splitvault.packing.split import export_model, split_program
from splitvault.packing.watermark_key import benign_chunks

pytestmark = pytest.mark.slow  # trains the digits model and packs it twice


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The digits demo's spec, benign data cut to 600 samples (300 clean, 300 augmented)."""
    data = digits.load_data()
    full = digits.spec_for(digits.train(data), data)
    assert full.benign_inputs is not None and full.benign_labels is not None
    count = len(data.train_x)
    picked = torch.cat([torch.arange(300), torch.arange(count, count + 300)])
    return dataclasses.replace(
        full,
        benign_inputs={"image": full.benign_inputs["image"][picked]},
        benign_labels=full.benign_labels[picked],
    )


def _pack(spec: ModelSpec, tmp_path: Path) -> tuple[list[MutableMapping[str, Any]], Path, Path]:
    layout = init_deployment(tmp_path / "d")
    with capture_logs() as logs:
        result = pack_spec(
            spec,
            name="digits",
            split=digits.SPLIT,
            layout=layout,
            provider=LocalFileKeyProvider.load(layout.kek),
            policy=TopKPolicy(k=3),
            show_progress=False,
        )
    return logs, result.back_path.parent, layout.kek


def test_pack_with_benign_data_keeps_a_key_within_the_bound(
    spec: ModelSpec, tmp_path: Path
) -> None:
    logs, back_dir, kek = _pack(spec, tmp_path)
    key = load_key(back_dir / WATERMARK_KEY_FILE, LocalFileKeyProvider.load(kek))
    drawn = [e for e in logs if e["event"] == "watermark_key_drawn"]
    (chosen,) = [e for e in logs if e["event"] == "watermark_key_chosen"]
    assert chosen["key_id"] == key.key_id and chosen["samples"] == 600
    assert chosen["draws"] == len(drawn)
    record = json.loads((back_dir / CHOICE_FILE).read_text())
    assert (record["key_id"], record["draws"], record["checked"]) == (key.key_id, len(drawn), True)
    assert all(float(e["benign_cost"]) > BOUND for e in drawn[:-1])  # redrawn only when over
    pair = split_program(export_model(spec), digits.SPLIT, spec.dynamic_dims)
    config = read_config(back_dir)
    benign = spec.benign_data()
    assert benign is not None
    cost = benign_cost(config, key, benign_chunks(pair, config, benign))  # measured afresh
    assert cost == pytest.approx(float(chosen["benign_cost"]), abs=1e-5)
    if any(e["event"] == "watermark_key_over_bound" for e in logs):  # every draw over: cheapest
        assert len(drawn) == MAX_DRAWS
        assert cost == pytest.approx(min(float(e["benign_cost"]) for e in drawn), abs=1e-5)
    else:
        assert key.key_id == drawn[-1]["key_id"] and cost <= BOUND


def test_pack_without_benign_data_keeps_the_first_key_and_says_so(
    spec: ModelSpec, tmp_path: Path
) -> None:
    bare = dataclasses.replace(spec, benign_inputs=None, benign_labels=None)
    logs, back_dir, _kek = _pack(bare, tmp_path)
    assert (back_dir / WATERMARK_KEY_FILE).exists()
    events = [e["event"] for e in logs]
    assert "watermark_key_drawn" not in events
    (unchecked,) = [e for e in logs if e["event"] == "watermark_key_unchecked"]
    assert unchecked["reason"] == "no labelled benign data"
    record = json.loads((back_dir / CHOICE_FILE).read_text())
    assert (record["draws"], record["checked"]) == (1, False)
