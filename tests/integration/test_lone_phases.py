"""Both tiers as real processes: they run with OpenMP's passive wait policy (set by the serve
commands before torch loads), and with ``debug_phase_marks`` on, a lone request's marks in
each tier form one timeline on the shared monotonic clock (bench/lone_breakdown.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from bench.phase_breakdown import merge
from shared.layout import DeployLayout
from shared.openmp import SERVING_SPIN_COUNT
from splitvault.demo import minilm
from splitvault.launcher import TierProcess, start_both
from tests.conftest import Deployment, issue_key
from tests.support.stack import copy_deployment, https, tier_env

pytestmark = pytest.mark.slow
MARKS = {
    "SPLITVAULT_PUBLIC_DEBUG_PHASE_MARKS": "true",
    "SPLITVAULT_PRIVATE_DEBUG_PHASE_MARKS": "true",
}
Tiers = tuple[DeployLayout, TierProcess, TierProcess, str]


@pytest.fixture(scope="module")
def tiers(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tiers]:
    skip = {"digits", "digits-label", "nested"}
    layout = copy_deployment(deployment.root, tmp_path_factory.mktemp("phases") / "d", skip)
    key = issue_key(layout, "phases")
    with ExitStack() as stack:
        public, private = start_both(layout.root, stack, env={**tier_env(), **MARKS})
        yield layout, public, private, key


def _body() -> dict[str, object]:
    tokens = minilm.tokenize(minilm.SENTENCES[:1])
    return {
        "inputs": [
            {"name": n, "shape": list(t.shape), "datatype": "INT64", "data": t.ravel().tolist()}
            for n, t in tokens.items()
        ]
    }


def test_both_tiers_run_with_a_short_openmp_spin(tiers: Tiers) -> None:
    _, public, private, _ = tiers
    for tier in (public, private):
        (event,) = tier.wait_for_events("openmp_wait_policy")
        assert (event["policy"], event["effective"]) == (
            f"GOMP_SPINCOUNT={SERVING_SPIN_COUNT}",
            True,
        )


def test_a_lone_request_leaves_one_timeline_across_both_tiers(tiers: Tiers) -> None:
    layout, public, private, key = tiers
    with https(layout, public.port, key) as http:
        for _ in range(2):  # the private tier logs a call's marks when the next one arrives
            reply = http.post("/v2/models/minilm/infer", json=_body())
            assert reply.status_code == 200, reply.text
    first_public = public.wait_for_events("request_phases", count=2)[0]["marks"]
    private_events = private.wait_for_events("request_phases", count=2)
    first_private = next(e["marks"] for e in private_events if e["marks"])
    timeline = merge((0, 2**63), first_public, first_private)
    names = [name for name, _ in timeline]
    times = [at for _, at in timeline]
    assert times == sorted(times), timeline  # the private call happened inside the public one
    for expected in ("route_entered", "private_in", "forward_done", "audit_committed"):
        assert expected in names
    assert sum(name.startswith("compute_start_") for name in names) == 2  # front, then back
