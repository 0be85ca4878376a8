"""One key's flood of marked queries cannot reduce another key's evidence (real tiers)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from private_core.watermark.triggers import TriggerRecord
from public_api.keys import parse_key_id
from shared.keys import LocalFileKeyProvider
from shared.manifest import LabelPolicy, WatermarkConfig
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.ownership.owner import OwnerModel
from splitvault.packing.pack import pack_spec
from tests.conftest import DigitsFixture, issue_key
from tests.support.processes import start_private, start_public
from tests.support.stack import https, image_request, tier_env

pytestmark = pytest.mark.slow
PER_KEY = 32  # trigger records each key may keep


def test_a_flooding_key_cannot_evict_another_keys_evidence(
    tmp_path: Path, digits_model: DigitsFixture
) -> None:
    layout = init_deployment(tmp_path / "d")
    watermark = WatermarkConfig(
        enabled=True,
        scheme="label",
        marks="query",  # per-query marks: half of all queries marked, whatever their region
        fraction=0.5,
        max_confidence=1,
        trigger_max_records=PER_KEY,
    )
    pack_spec(
        digits_model.spec,
        name="digits",
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=LabelPolicy(),
        show_progress=False,
        watermark=watermark,
    )
    owner = OwnerModel(layout.root, "digits")
    images = digits_model.data.test_x
    marks = owner.candidates({"image": images}, owner.marker()).marks
    ids = owner.marker().query_ids(owner.back_inputs({"image": images}))
    victim_rows = range(0, 40)
    victim_marked = {ids[i].hex() for i in victim_rows if marks_of(owner, images[i : i + 1])}
    probe = next(i for i in range(400, 450) if marks_of(owner, images[i : i + 1]))
    assert victim_marked and marks.selected.sum() > 2 * PER_KEY
    victim, flooder = issue_key(layout, "victim"), issue_key(layout, "flooder")
    private = start_private(layout.root, env=tier_env())
    try:
        public = start_public(layout.root, private.port, env=tier_env())
        try:
            with https(layout, public.port, victim) as client:
                _infer(client, images[list(victim_rows)])
            with https(layout, public.port, flooder) as client:
                for start in range(100, 400, 64):  # many distinct marked queries
                    _infer(client, images[start : min(start + 64, 400)])
                for _ in range(10):  # one marked query, 64 times a request
                    _infer(client, np.repeat(images[probe : probe + 1], 64, axis=0))
        finally:
            public.stop()
        flooder_id = parse_key_id(flooder)
        private.wait_for_events("marked_query_repeated", count=9)  # 2, 4, ..., 512
    finally:
        assert private.stop() == 0  # SIGTERM: the queued trigger records are written
    victim_id = parse_key_id(victim)
    kept: dict[str, list[TriggerRecord]] = {}
    for record in OwnerModel(layout.root, "digits").triggers():  # the logs written since
        kept.setdefault(record.key_id, []).append(record)
    assert {r.query_id for r in kept[str(victim_id)]} == victim_marked  # all of it, untouched
    flood = kept[str(flooder_id)]
    assert len(flood) <= PER_KEY  # the flooder's own oldest records made room
    repeated = [r for r in flood if r.query_id == ids[probe].hex()]
    assert len(repeated) == 1 and repeated[0].count == 640  # one record, with its count
    events = [e for e in private.events() if e.get("event") == "marked_query_repeated"]
    assert {e["key_id"] for e in events} == {flooder_id}
    assert max(e["count"] for e in events) == 512


def marks_of(owner: OwnerModel, image: np.ndarray) -> bool:
    """Whether the private tier marks this one query."""
    return bool(owner.candidates({"image": image}, owner.marker()).marks.selected[0])


def _infer(client: httpx.Client, images: np.ndarray) -> None:
    response = client.post("/v2/models/digits/infer", json=image_request(images))
    assert response.status_code == 200, response.text
