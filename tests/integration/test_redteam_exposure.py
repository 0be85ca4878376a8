"""Red-team findings 1, 5, 11 and 12 (issue 12), each replayed against real tier processes.

One private tier and three public tiers, each public tier on its own copy of the deployment:

* ``block``: a monitor that blocks, limits out of the way; started on a copy whose state folders
  were left open to other users (an old deployment's modes);
* ``direct``: tight per-address limits, no trusted proxy (the default), a monitor that only
  records (a setting that switches a protection off);
* ``proxied``: the same behind a proxy named in ``trusted_proxies`` (127.0.0.1).

Attacks that go through a public ingress are written against ``Ingress`` and parametrized
over ``INGRESSES``: a new ingress is tested by adding one entry. Each ingress speaks from an
address of its own (the per-address limits are the tier's, whichever the ingress) and spends
keys of its own (``Ingress.key``). The v2 gRPC ingress takes the client's address from the
connection's peer and never from metadata, a trusted proxy's included: the trusted-proxy
replay is not one of its findings (its ``x-forwarded-for`` metadata is ignored, which the
untrusted-peer replay checks). Its clients accept the terms over REST, having been told to
(PERMISSION_DENIED naming ``/v1/terms``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx
import numpy as np
import pytest

from public_api.audit import AUDIT_DB, export_records
from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore, parse_key_id
from public_api.monitor import read_assessments
from public_api.monitor.cli import monitor_log_path
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy
from splitvault.demo import digits
from splitvault.packing.pack import pack_spec
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.grpc_ingress import V2GrpcClient
from tests.support.processes import TierProcess, start_private, start_public, wait_for
from tests.support.stack import cli, copy_deployment, https, image_request, poll, tier_env

pytestmark = pytest.mark.slow

WIDE = "digits-wide"  # the digits model packed to take 256 rows per request
IP_BURST = 4
# Per-address limits that cannot refill while a test runs; per-key limits out of the way.
TIGHT = {"ip_limits__rate_per_s": 0.01, "ip_limits__burst": IP_BURST}
GRPC_ON = {"SPLITVAULT_PUBLIC_GRPC_PORT": "0"}
PUBLIC_ENV = {
    "block": {**tier_env(monitor_action="block"), **GRPC_ON},
    "direct": {**tier_env(**TIGHT), **GRPC_ON},
    "proxied": {**tier_env(**TIGHT), "SPLITVAULT_PUBLIC_TRUSTED_PROXIES": '["127.0.0.1"]'},
}
# Keys issued in each copy before its tier starts: copy -> names.
KEYS = {
    "block": ["metrics", "hider", "files"],
    "direct": ["forger", "health"],
    "proxied": ["proxied"],
}
UNACCEPTED = {"direct": ["forger-terms"], "proxied": ["proxied-terms"]}
# Keys an attack spends, issued once more for each other ingress ("forger@grpc").
SPENT = {"metrics", "hider", "forger", "forger-terms"}
GRPC_ADDRESS = "127.0.0.7"  # the gRPC ingress's clients' address (through a Relay)


@dataclass(frozen=True)
class Tier:
    """A public tier, the deployment copy it serves and the keys issued there."""

    layout: DeployLayout
    process: TierProcess
    keys: dict[str, str]
    grpc_port: int | None = None

    @property
    def state(self) -> Path:
        return self.layout.public.root / STATE_DIR

    def key_id(self, name: str) -> str:
        key_id = parse_key_id(self.keys[name])
        assert key_id is not None
        return key_id


@dataclass(frozen=True)
class Reply:
    status: int
    body: str


class Ingress(Protocol):
    """How an attacker reaches a public tier: one implementation per public endpoint."""

    name: str
    address: str  # the client address the tier sees

    def key(self, name: str) -> str:
        """The name of this ingress's copy of the key ``name``."""
        ...

    def infer(
        self, tier: Tier, key: str, model: str, x: np.ndarray, forwarded_for: str | None = None
    ) -> int:
        """Run ``x`` through ``model``; the status as HTTP would give it."""
        ...

    def accept_terms(self, tier: Tier, key: str, forwarded_for: str | None = None) -> int:
        """Accept the current terms (version "1") with ``key``."""
        ...

    def scrape(self, tier: Tier, key: str) -> list[Reply]:
        """Every way this ingress might hand out the tier's metrics, anonymous and keyed."""
        ...


class Rest:
    """The v2 REST endpoint (HTTPS); ``forwarded_for`` is sent as ``X-Forwarded-For``."""

    name = "rest"
    address = "127.0.0.1"

    def key(self, name: str) -> str:
        return name

    def infer(
        self, tier: Tier, key: str, model: str, x: np.ndarray, forwarded_for: str | None = None
    ) -> int:
        body = image_request(x)
        with https(tier.layout, tier.process.port, key) as http:
            reply = http.post(
                f"/v2/models/{model}/infer", json=body, headers=_forwarded(forwarded_for)
            )
        return reply.status_code

    def accept_terms(self, tier: Tier, key: str, forwarded_for: str | None = None) -> int:
        with https(tier.layout, tier.process.port, key) as http:
            reply = http.post(
                "/v1/terms/accept", json={"version": "1"}, headers=_forwarded(forwarded_for)
            )
        return reply.status_code

    def scrape(self, tier: Tier, key: str) -> list[Reply]:
        replies = []
        for token in (None, key):
            with https(tier.layout, tier.process.port, token) as http:
                for path in ("/metrics", "/metrics/"):
                    reply = http.get(path)
                    replies.append(Reply(reply.status_code, reply.text))
        return replies


# The HTTP status of each gRPC code these attacks meet (shared/errors.py), UNIMPLEMENTED as 404.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}


class Grpc:
    """The v2 gRPC ingress, from ``GRPC_ADDRESS``; ``forwarded_for`` is sent as
    ``x-forwarded-for`` metadata. Terms are accepted over REST (from the same address)."""

    name = "grpc"
    address = GRPC_ADDRESS

    def key(self, name: str) -> str:
        return f"{name}@{self.name}"

    def _client(self, tier: Tier) -> V2GrpcClient:
        assert tier.grpc_port is not None, "this tier serves no gRPC ingress"
        return V2GrpcClient(tier.grpc_port, tier.layout.public.ca_cert, self.address)

    def infer(
        self, tier: Tier, key: str, model: str, x: np.ndarray, forwarded_for: str | None = None
    ) -> int:
        metadata = () if forwarded_for is None else (("x-forwarded-for", forwarded_for),)
        with self._client(tier) as client:
            reply = client.infer(x, key, model, metadata)
        return HTTP_STATUS[reply.code]

    def accept_terms(self, tier: Tier, key: str, forwarded_for: str | None = None) -> int:
        with self._client(tier) as client:
            told = client.infer(np.zeros((1, 1, 8, 8), np.float32), key)
        if told.code != grpc.StatusCode.PERMISSION_DENIED or "/v1/terms" not in told.message:
            return HTTP_STATUS.get(told.code, 500)
        context = ssl.create_default_context(cafile=str(tier.layout.public.ca_cert))
        transport = httpx.HTTPTransport(verify=context, local_address=self.address)
        with httpx.Client(
            base_url=f"https://localhost:{tier.process.port}", transport=transport, timeout=30
        ) as http:
            reply = http.post(
                "/v1/terms/accept",
                json={"version": "1"},
                headers={"Authorization": f"Bearer {key}", **_forwarded(forwarded_for)},
            )
        return reply.status_code

    def scrape(self, tier: Tier, key: str) -> list[Reply]:
        """Triton's statistics RPC, where a stock server hands out per-model counters."""
        replies = []
        with self._client(tier) as client:
            for token in (None, key):
                reply = client.call("ModelStatistics", b"", token)
                replies.append(Reply(HTTP_STATUS.get(reply.code, 500), reply.message))
        return replies


INGRESSES: list[Ingress] = [Rest(), Grpc()]


def _forwarded(address: str | None) -> dict[str, str]:
    return {} if address is None else {"X-Forwarded-For": address}


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _loosen(folder: Path) -> None:
    """Modes an old deployment left: folders 0755, files 0644."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@dataclass(frozen=True)
class Exposure:
    private: TierProcess
    tiers: dict[str, Tier]


@pytest.fixture(scope="module")
def exposure(
    deployment: Deployment,
    digits_model: DigitsFixture,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Exposure]:
    root = tmp_path_factory.mktemp("exposure")
    base = copy_deployment(deployment.root, root / "block", {"minilm", "nested"})
    pack_spec(
        digits_model.spec,
        name=WIDE,
        split=digits.SPLIT,
        layout=base,
        provider=deployment.provider,
        policy=TopKPolicy(k=3),
        max_batch_size=256,
        show_progress=False,
    )
    layouts = {"block": base}
    for name in ("direct", "proxied"):
        shutil.copytree(base.root, root / name)
        layouts[name] = DeployLayout(root / name)
    keys = {
        name: {key: issue_key(layouts[name], key) for key in _each_ingress(KEYS[name])}
        | {
            key: issue_key(layouts[name], key, accept_terms=False)
            for key in _each_ingress(UNACCEPTED.get(name, []))
        }
        for name in layouts
    }
    _loosen(base.public.root / STATE_DIR)
    (base.private.state / "triggers").mkdir(parents=True)
    (base.private.state / "notes.txt").write_text("left by an operator\n")
    _loosen(base.private.state)
    with contextlib.ExitStack() as stack, _umask(0o022):
        private = start_private(base.root, env=tier_env())
        stack.callback(private.stop)
        tiers = {}
        for name, layout in layouts.items():
            process = start_public(layout.root, private.port, env=PUBLIC_ENV[name])
            stack.callback(process.stop)
            grpc_port = None
            if "SPLITVAULT_PUBLIC_GRPC_PORT" in PUBLIC_ENV[name]:
                (listening,) = process.wait_for_events("grpc_ingress_listening")
                grpc_port = int(listening["port"])
            tiers[name] = Tier(layout, process, keys[name], grpc_port)
        yield Exposure(private, tiers)


def _each_ingress(names: list[str]) -> list[str]:
    """``names``, and each ingress's copy of those an attack spends."""
    copies = [ingress.key(name) for ingress in INGRESSES for name in names if name in SPENT]
    return list(dict.fromkeys([*names, *copies]))


def _images(digits_model: DigitsFixture, n: int = 1) -> np.ndarray:
    return np.ascontiguousarray(digits_model.data.test_x[:n], dtype=np.float32)


def _audited_clients(tier: Tier, key: str, count: int) -> list[str]:
    """The client addresses of ``key``'s audit records, once ``count`` are written."""
    path = tier.state / AUDIT_DB
    records: list[dict[str, Any]] = []

    def written() -> bool:
        records[:] = export_records(path, tier.key_id(key))
        return len(records) >= count

    poll(written, f"{count} audit records of {key}")
    return [record["client"] for record in records]


def _accepted_from(tier: Tier, key: str) -> list[str]:
    store = SqliteKeyStore(tier.state / KEYS_DB)
    try:
        return [a["client_address"] for a in store.acceptances(tier.key_id(key))]
    finally:
        store.close()


def _event(process: TierProcess, name: str) -> dict[str, Any]:
    return next(e for e in process.events() if e.get("event") == name)


# --- finding 1: /metrics on the public listener --------------------------------------------


@pytest.mark.parametrize("ingress", INGRESSES, ids=lambda i: i.name)
def test_public_ingress_publishes_no_metrics(
    exposure: Exposure, digits_model: DigitsFixture, ingress: Ingress
) -> None:
    """The attack: read one's own risk score (and the other keys') after each batch."""
    tier = exposure.tiers["block"]
    key = tier.keys[ingress.key("metrics")]
    assert ingress.infer(tier, key, "digits", _images(digits_model, 3)) == 200
    replies = ingress.scrape(tier, key)
    assert {reply.status for reply in replies} == {404}, replies
    assert not [reply for reply in replies if "splitvault_" in reply.body]
    # The operators' scrape still sees it, on the internal listener bound to loopback.
    listening = _event(tier.process, "public_tier_listening")
    assert listening["metrics_host"] == "127.0.0.1"
    internal = httpx.get(tier.process.metrics_url, timeout=10)
    assert internal.status_code == 200
    key_id = tier.key_id(ingress.key("metrics"))
    assert f'splitvault_key_risk_score{{key_id="{key_id}"}}' in internal.text


# --- finding 5: X-Forwarded-For believed from 127.0.0.1 -------------------------------------


@pytest.mark.parametrize("ingress", INGRESSES, ids=lambda i: i.name)
def test_forwarded_for_from_an_untrusted_peer_picks_no_address(
    exposure: Exposure, digits_model: DigitsFixture, ingress: Ingress
) -> None:
    """The attack: a new forged address per request, through a local proxy that passes the
    header on; per-address limits never fire and the trail records the forged addresses."""
    tier, forger, terms = (
        exposure.tiers["direct"],
        ingress.key("forger"),
        ingress.key("forger-terms"),
    )
    statuses = [
        ingress.infer(tier, tier.keys[forger], "digits", _images(digits_model), f"6.6.6.{i}")
        for i in range(2 * IP_BURST)
    ]
    assert statuses == [200] * IP_BURST + [429] * IP_BURST
    assert set(_audited_clients(tier, forger, 2 * IP_BURST)) == {ingress.address}
    assert ingress.accept_terms(tier, tier.keys[terms], "6.6.6.6") == 200
    assert _accepted_from(tier, terms) == [ingress.address]


@pytest.mark.parametrize("ingress", [Rest()], ids=lambda i: i.name)
def test_a_trusted_proxy_forwards_addresses_and_ipv6_is_limited_per_64(
    exposure: Exposure, digits_model: DigitsFixture, ingress: Ingress
) -> None:
    """Behind a trusted proxy the forwarded address counts; an IPv6 client rotating addresses
    inside its /64 is still one subject of the per-address limits."""
    tier = exposure.tiers["proxied"]
    rotated = [f"2001:db8:0:1::{i + 1:x}" for i in range(2 * IP_BURST)]
    statuses = [
        ingress.infer(tier, tier.keys["proxied"], "digits", _images(digits_model), address)
        for address in rotated
    ]
    assert statuses == [200] * IP_BURST + [429] * IP_BURST
    other = "2001:db8:0:2::1"  # the next /64 has a budget of its own
    assert ingress.infer(tier, tier.keys["proxied"], "digits", _images(digits_model), other) == 200
    assert _audited_clients(tier, "proxied", len(rotated) + 1) == [*rotated, other]
    assert ingress.accept_terms(tier, tier.keys["proxied-terms"], "203.0.113.9") == 200
    assert _accepted_from(tier, "proxied-terms") == ["203.0.113.9"]


# --- finding 11: the monitor analysed fixed positions ---------------------------------------


@pytest.mark.parametrize("ingress", INGRESSES, ids=lambda i: i.name)
def test_rows_hidden_between_the_old_fixed_positions_are_analysed(
    exposure: Exposure, digits_model: DigitsFixture, ingress: Ingress
) -> None:
    """The attack: in a batch of 128, natural digits at the 64 evenly spaced positions the
    monitor analysed, and the queries that matter (here uniform noise, far outside the
    reference) in between. Analysed at random, about half the analysed rows are noise."""
    tier = exposure.tiers["block"]
    flat = digits_model.data.test_x.reshape(len(digits_model.data.test_x), -1)
    natural = np.unique(flat, axis=0)[:64].reshape(64, 1, 8, 8)  # distinct: none is a repeat
    batch = np.random.default_rng(11).uniform(0.0, 1.0, (128, 1, 8, 8)).astype(np.float32)
    batch[np.linspace(0, 127, 64).round().astype(np.int64)] = natural
    assert ingress.infer(tier, tier.keys[ingress.key("hider")], WIDE, batch) == 200
    hider = tier.key_id(ingress.key("hider"))
    (assessment,) = read_assessments(monitor_log_path(tier.layout.root), hider)
    assert assessment.queries == 128
    assert any(reason.startswith("OOD") for reason in assessment.reasons), assessment.reasons


# --- finding 12: state files readable by any local user; protections off in silence ----------


def _loose(folder: Path) -> dict[str, str]:
    """Paths under ``folder`` (itself included) open to group or others, with their modes."""
    loose = {}
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            loose[str(path.relative_to(folder.parent))] = f"{mode:04o}"
    return loose


def test_state_is_readable_only_by_the_tier_user(
    exposure: Exposure, digits_model: DigitsFixture
) -> None:
    """Under umask 022 SQLite made 0644 databases: client addresses and key hashes for any
    local user. Started on state left 0755/0644, each tier tightens it and says so."""
    tier = exposure.tiers["block"]
    assert Rest().infer(tier, tier.keys["files"], "digits", _images(digits_model)) == 200
    for name, public in exposure.tiers.items():
        state = public.state
        assert (state / "audit.sqlite3-wal").exists() and (state / "monitor.sqlite3").exists()
        assert _loose(state) == {}, name
    private_state = exposure.tiers["block"].layout.private.state
    assert _loose(private_state) == {}
    fixed = {
        e["path"]
        for e in exposure.tiers["block"].process.events()
        if e.get("event") == "state_permissions_fixed"
    }
    assert {str(tier.state), str(tier.state / KEYS_DB)} <= fixed
    private_fixed = {
        e["path"] for e in exposure.private.events() if e.get("event") == "state_permissions_fixed"
    }
    assert {str(private_state), str(private_state / "notes.txt")} <= private_fixed


def _health(tier: Tier) -> tuple[int, str]:
    result = cli(
        "health",
        "public",
        "--url",
        f"https://localhost:{tier.process.port}",
        "--metrics-url",
        tier.process.metrics_url,
        deploy=tier.layout.root,
    )
    return result.returncode, result.stdout + result.stderr


def test_settings_that_switch_protections_off_are_loud(exposure: Exposure) -> None:
    """``monitor_action = "record"`` left from a test run: the tier says so at start and
    ``splitvault health public`` shows it. Key groups are off in every test tier (all test
    clients share 127.0.0.1, so a tier's keys would form one group): each tier says that too,
    and a tier with every other protection on says nothing else."""
    groups_off = ("protection.groups_enabled", "false", "warning")
    direct = exposure.tiers["direct"]
    warnings = [e for e in direct.process.events() if e.get("event") == "unsafe_setting"]
    assert [(e["setting"], e["value"], e["level"]) for e in warnings] == [
        ("protection.monitor_action", "record", "warning"),
        groups_off,
    ]
    code, output = _health(direct)
    assert code == 0 and output.splitlines()[0] == "ready", output
    assert "WARNING: unsafe setting protection.monitor_action = record" in output
    block = exposure.tiers["block"]
    warnings = [e for e in block.process.events() if e.get("event") == "unsafe_setting"]
    assert [(e["setting"], e["value"], e["level"]) for e in warnings] == [groups_off]
    wait_for(lambda: _health(block)[0] == 0, timeout=30, what="the block tier's health")
    code, output = _health(block)
    assert code == 0 and output.splitlines()[0] == "ready", output
    assert "WARNING: unsafe setting protection.groups_enabled = false" in output
    assert "monitor_action" not in output
