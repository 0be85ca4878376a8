"""``splitvault models``: both tiers' copies listed, re-policed and deleted together."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

import pytest

from private_core.watermark.keys import WATERMARK_KEY_FILE
from shared.layout import DeployLayout, TierDir
from shared.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    LabelPolicy,
    ModelConfig,
    StageManifest,
    TierCount,
    TopKPolicy,
    WatermarkConfig,
    read_config,
    write_json,
)
from shared.pairing import mismatch_reason, pairing_id
from splitvault.model_admin import RETIRED_DIR, delete_model, list_models, set_policy
from splitvault.models_cli import add_models_commands

PAIR = pairing_id("aa" * 32, "bb" * 32)


def _write(
    layout: DeployLayout, name: str, *, pairing: str | None = PAIR, tiers: str = "both"
) -> None:
    config = ModelConfig(
        name=name,
        split="features.1",
        task="classification",
        policy=TopKPolicy(k=3),
        labels=[str(i) for i in range(10)],
        watermark=WatermarkConfig(enabled=True, scheme="signal"),
    )
    count = TierCount(parameters=1, bytes=4)
    stages: tuple[tuple[TierDir, Literal["front", "back"]], ...] = (
        (layout.public, "front"),
        (layout.private, "back"),
    )
    for tier, stage in stages:
        if tiers not in ("both", stage):
            continue
        folder = tier.model(name)
        folder.mkdir(parents=True)
        copy = config if stage == "back" else config.model_copy(update={"watermark": None})
        write_json(folder / CONFIG_FILE, copy)
        manifest = StageManifest(
            model=name,
            stage=stage,
            file=f"{stage}.pt2",
            encrypted=stage == "back",
            sha256="00" * 32,
            inputs=[],
            outputs=[],
            tiers={"public": count, "private": count},
            torch_version="2.13.0",
            pairing_id=pairing if stage == "back" else PAIR,
        )
        write_json(folder / MANIFEST_FILE, manifest)
    if tiers in ("both", "back"):
        (layout.private.model(name) / WATERMARK_KEY_FILE).write_bytes(b"SVENC...")


@pytest.fixture
def layout(tmp_path: Path) -> DeployLayout:
    layout = DeployLayout(tmp_path / "deploy")
    _write(layout, "good")
    _write(layout, "stale", pairing=pairing_id("cc" * 32, "bb" * 32))
    _write(layout, "half", tiers="front")
    return layout


def test_pairing_ids_name_the_pack() -> None:
    assert pairing_id("aa" * 32, "bb" * 32) == PAIR and len(PAIR) == 32
    assert pairing_id("aa" * 32, "bc" * 32) != PAIR
    assert mismatch_reason("m", PAIR, PAIR) is None
    assert mismatch_reason("m", None, None) is None  # packed before pairing ids
    reason = mismatch_reason("m", PAIR, None)
    assert reason is not None and "restart both tiers" in reason and "unpaired" in reason


def test_list_says_what_each_models_copies_disagree_on(layout: DeployLayout) -> None:
    entries = {entry.name: entry for entry in list_models(layout)}
    assert entries["good"].problems == []
    (stale,) = entries["stale"].problems
    assert "different packs" in stale
    assert entries["half"].problems == ["no private copy (half-deleted or half-copied)"]


def test_set_policy_changes_both_copies_or_neither(layout: DeployLayout) -> None:
    set_policy(layout, "good", TopKPolicy(k=1, decimals=2))
    for tier in (layout.public, layout.private):
        assert read_config(tier.model("good")).policy == TopKPolicy(k=1, decimals=2)
    assert read_config(layout.private.model("good")).watermark is not None  # kept
    assert read_config(layout.public.model("good")).watermark is None  # never public
    before = [
        (tier.model("good") / CONFIG_FILE).read_text() for tier in (layout.public, layout.private)
    ]
    with pytest.raises(ValueError, match="signal watermark needs the topk policy"):
        set_policy(layout, "good", LabelPolicy())
    after = [
        (tier.model("good") / CONFIG_FILE).read_text() for tier in (layout.public, layout.private)
    ]
    assert after == before
    with pytest.raises(ValueError, match="no readable private copy"):
        set_policy(layout, "half", TopKPolicy(k=1))
    with pytest.raises(KeyError):
        set_policy(layout, "nothing", TopKPolicy(k=1))


def test_delete_removes_both_copies_and_keeps_the_watermark_key(layout: DeployLayout) -> None:
    kept = delete_model(layout, "good")
    assert not layout.public.model("good").exists() and not layout.private.model("good").exists()
    assert kept is not None and kept.read_bytes() == b"SVENC..."
    assert kept.parent.parent == layout.private.root / RETIRED_DIR
    assert "good" not in {entry.name for entry in list_models(layout)}
    assert delete_model(layout, "half") is None  # a half-deleted model can be finished off
    assert sorted(p.name for p in layout.public.models.iterdir()) == ["stale"]
    with pytest.raises(KeyError):
        delete_model(layout, "good")


def test_cli_reports_problems_and_unknown_models(
    layout: DeployLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="splitvault")
    add_models_commands(parser.add_subparsers(dest="command", required=True))

    def run(*words: str) -> int:
        args = parser.parse_args(["models", *words, "--deploy", str(layout.root)])
        return int(args.run(args))

    assert run("list") == 1  # problems: exit 1
    listed = capsys.readouterr().out
    assert "good" in listed and "top-3" in listed and "different packs" in listed
    assert run("show", "good") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["copies"]["public"]["pairing_id"] == PAIR and shown["problems"] == []
    assert run("show", "nothing") == 1
    assert "no model 'nothing'" in capsys.readouterr().err
    assert run("set-policy", "good", "--policy", "topk", "--k", "2") == 0
    assert "restart both tiers" in capsys.readouterr().out
    assert run("delete", "nothing") == 1
