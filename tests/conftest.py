"""Session fixtures: the demo models, a packed deployment and both tiers as real processes."""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from splitvault_client import Client

from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore
from public_api.terms import load_terms
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import LabelPolicy, RoundingPolicy, TopKPolicy, WatermarkConfig
from splitvault.demo import digits, minilm
from splitvault.deploy import init_deployment
from splitvault.packing.pack import pack_spec
from splitvault.packing.spec import ModelSpec
from tests.support.isolation import isolation, isolation_problem
from tests.support.models import nested_spec
from tests.support.netguard import NETGUARD_DIR
from tests.support.netguard import sitecustomize as netguard
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import tier_env

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# Every Python process the tests start imports the loopback-only connect guard at start-up
# (scripts/test.sh sets PYTHONPATH already; this covers a bare ``pytest``).
if str(NETGUARD_DIR) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(NETGUARD_DIR), os.environ.get("PYTHONPATH")])
    )
netguard.install()


def pytest_report_header() -> list[str]:
    return [f"network isolation: {isolation()}"]


def pytest_sessionstart(session: pytest.Session) -> None:
    problem = isolation_problem()
    if problem is not None:
        raise pytest.UsageError(problem)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The time spent in slow-marked tests and in the rest (setup and teardown included)."""
    totals = {"slow": [0, 0.0], "other": [0, 0.0]}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if not isinstance(report, pytest.TestReport):
                continue
            bucket = totals["slow" if "slow" in report.keywords else "other"]
            bucket[0] += report.when == "call"
            bucket[1] += report.duration
    parts = [f"{name}: {int(n)} tests, {seconds:.0f} s" for name, (n, seconds) in totals.items()]
    terminalreporter.write_line("test time by mark: " + "; ".join(parts))


@dataclass(frozen=True)
class DigitsFixture:
    """The trained digits CNN, its data and its pack spec."""

    data: digits.DigitsData
    spec: ModelSpec


@pytest.fixture(scope="session")
def digits_model() -> DigitsFixture:
    data = digits.load_data()
    model = digits.train(data, epochs=8)
    spec = digits.spec_for(model, data)
    return DigitsFixture(data, spec)


@pytest.fixture(scope="session")
def minilm_spec() -> ModelSpec:
    return minilm.factory()


@dataclass(frozen=True)
class Deployment:
    """A deployment folder with the test models packed into it, and an API key for tests."""

    layout: DeployLayout
    provider: LocalFileKeyProvider
    api_key: str

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def ca_cert(self) -> Path:
        return self.layout.public.ca_cert


@pytest.fixture(scope="session")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture, minilm_spec: ModelSpec
) -> Deployment:
    """digits (top-3, FP16), digits-label (label only, FP32), nested (top-2, FP32), minilm.

    The classifiers are packed with the watermark off: tests compare their answers with the
    unsplit model (tests/unit/private_core/test_watermark_regions.py covers the marks)."""
    layout = init_deployment(tmp_path_factory.mktemp("deploy") / "d")
    provider = LocalFileKeyProvider.load(layout.kek)
    pack = functools.partial(
        pack_spec,
        layout=layout,
        provider=provider,
        show_progress=False,
        watermark=WatermarkConfig(enabled=False),
    )
    pack(digits_model.spec, name="digits", split=digits.SPLIT, policy=TopKPolicy(k=3))
    pack(
        digits_model.spec,
        name="digits-label",
        split=digits.SPLIT,
        policy=LabelPolicy(),
        transport_datatype="FP32",
    )
    pack(
        nested_spec(),
        name="nested",
        split="encoder.blocks.1.mlp.0",
        policy=TopKPolicy(k=2, decimals=6),
        transport_datatype="FP32",
    )
    pack(
        minilm_spec,
        name="minilm",
        split=minilm.SPLIT,
        policy=RoundingPolicy(decimals=5),
        watermark=None,
    )
    return Deployment(layout, provider, issue_key(layout, "tests"))


def issue_key(layout: DeployLayout, name: str, *, accept_terms: bool = True, **limits: Any) -> str:
    """A new API key in the deployment's key store, having accepted the default terms."""
    store = SqliteKeyStore(layout.public.root / STATE_DIR / KEYS_DB)
    try:
        key, secret = store.create(name, **limits)
        if accept_terms:
            terms = load_terms(layout.public.root / "terms.md", "1")
            store.record_acceptance(key.key_id, terms.version, terms.sha256, "127.0.0.1", 0.0)
    finally:
        store.close()
    return secret


@dataclass
class Tiers:
    """Both tiers running as subprocesses."""

    private: TierProcess
    public: TierProcess
    deployment: Deployment

    @property
    def url(self) -> str:
        return f"https://localhost:{self.public.port}"

    @property
    def private_address(self) -> str:
        return f"127.0.0.1:{self.private.port}"

    def http(self, *, authenticated: bool = True, **kwargs: Any) -> httpx.Client:
        """A raw HTTPS client that trusts the deployment's CA (and sends the test key)."""
        context = ssl.create_default_context(cafile=str(self.deployment.ca_cert))
        headers = self.deployment.auth_headers if authenticated else {}
        return httpx.Client(base_url=self.url, verify=context, headers=headers, **kwargs)

    def client(self) -> Client:
        """The SDK client with the test key."""
        return Client(self.url, api_key=self.deployment.api_key, ca=self.deployment.ca_cert)


@pytest.fixture(scope="session")
def tiers(deployment: Deployment) -> Iterator[Tiers]:
    # Generous limits and a monitor that records only (tier_env), so that the many test requests
    # of one key are neither throttled nor blocked; protection tests start their own tiers.
    private = start_private(deployment.root, env=tier_env())
    try:
        public = start_public(deployment.root, private.port, env=tier_env())
    except BaseException:
        private.stop()
        raise
    yield Tiers(private, public, deployment)
    public.stop()
    private.stop()
