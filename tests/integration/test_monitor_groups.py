"""Key groups in a real public tier: ten keys from one IPv6 /64 are blocked as one group, keys
from addresses of their own are not, and the operator sees and clears the group by the CLI.

Clients reach the tier through a proxy named in ``trusted_proxies`` (127.0.0.1) that says each
client's address in ``X-Forwarded-For``; every key accepts the terms from its own address (the
terms-acceptance address is evidence too). Groups are formed every half second.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from public_api.keys import parse_key_id
from shared.layout import DeployLayout
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import cli, copy_deployment, https, image_request, tier_env

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
THIEF_NET = "2001:db8:7:7::"
PER_KEY = 320  # five batches of 64: 3,200 queries in all, no key near a verdict of its own


@dataclass
class Stack:
    layout: DeployLayout
    public: TierProcess
    keys: dict[str, tuple[str, str]]  # name -> (secret, client address)

    def call(self, name: str, images: np.ndarray) -> int:
        secret, address = self.keys[name]
        with https(self.layout, self.public.port, secret) as client:
            response = client.post(
                INFER, json=image_request(images), headers={"X-Forwarded-For": address}
            )
        return response.status_code


@pytest.fixture(scope="module")
def stack(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("groups") / "d"
    layout = copy_deployment(deployment.layout.root, root, skip_models={"minilm"})
    addresses = {f"thief-{k}": f"{THIEF_NET}{k + 1:x}" for k in range(10)}
    addresses |= {f"benign-{k}": f"192.0.2.{k + 1}" for k in range(3)}
    keys = {name: (issue_key(layout, name, accept_terms=False), a) for name, a in addresses.items()}
    env = {
        **tier_env(monitor_action="block", groups_enabled=True, group_interval_s=0.5),
        "SPLITVAULT_PUBLIC_TRUSTED_PROXIES": '["127.0.0.1"]',
    }
    private = start_private(root, env=tier_env())
    try:
        public = start_public(root, private.port, env=env)
        try:
            stack = Stack(layout, public, keys)
            for secret, address in keys.values():
                with https(layout, public.port, secret) as client:
                    accepted = client.post(
                        "/v1/terms/accept",
                        json={"version": "1"},
                        headers={"X-Forwarded-For": address},
                    )
                assert accepted.status_code == 200, accepted.text
            yield stack
        finally:
            public.stop()
    finally:
        private.stop()


def test_keys_of_one_net_are_blocked_as_a_group_and_cleared_by_the_operator(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    data = digits_model.data
    for k in range(3):
        assert stack.call(f"benign-{k}", data.test_x[k * 40 : k * 40 + 40]) == 200
    # Each key one class (none covers the classes, all together do), round after round: every
    # key is in the group long before the group's volume can block it, which may happen at any
    # round (the pass runs on its own clock); a refused key stops.
    refused: set[int] = set()
    for start in range(0, PER_KEY, 64):
        for k in sorted(set(range(10)) - refused):
            images = data.test_x[data.test_y == k]
            rows = images[np.arange(start, start + 64) % len(images)]
            status = stack.call(f"thief-{k}", rows)
            assert status in (200, 403)
            if status == 403:
                refused.add(k)

    (event,) = stack.public.wait_for_events("monitor_group_blocked", timeout=60)
    thieves = sorted(_key_id(stack, f"thief-{k}") for k in range(10))
    assert event["members"] == thieves and event["queries"] <= 10 * PER_KEY
    assert all(": /64 2001:db8:7:7::/64" in link for link in event["links"])
    alone = [e for e in stack.public.events() if e.get("event") == "extraction_blocked"]
    assert alone == []  # no key was blocked on its own
    sample = data.test_x[:1]
    assert [stack.call(f"thief-{k}", sample) for k in range(10)] == [403] * 10
    assert [stack.call(f"benign-{k}", sample) for k in range(3)] == [200] * 3

    shown = cli("monitor", "show", "--groups", deploy=stack.layout.root)
    assert shown.returncode == 0, shown.stderr
    group_id = event["group_id"]
    assert f"{group_id}" in shown.stdout and "blocked" in shown.stdout
    assert f"members: {', '.join(thieves)}" in shown.stdout
    assert all(_key_id(stack, f"benign-{k}") not in shown.stdout for k in range(3))

    cleared = cli("monitor", "clear", "--group", group_id, deploy=stack.layout.root)
    assert cleared.returncode == 0, cleared.stderr
    stack.public.wait_for_events("monitor_group_operator_clear", timeout=60)
    assert [stack.call(f"thief-{k}", sample) for k in range(10)] == [200] * 10


def _key_id(stack: Stack, name: str) -> str:
    key_id = parse_key_id(stack.keys[name][0])
    assert key_id is not None
    return key_id
