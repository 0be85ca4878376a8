"""A private tier started with the old KEK after ``keys rotate-kek`` is not healthy, and says why.

It loads no model, so it reports NOT_SERVING; ``splitvault health private`` prints which model
failed and why and exits 1 (``--live``, the liveness probe, exits 0: the process answers); the
public tier's readiness and ``splitvault health public`` say not ready; the model list says the
private tier could not load it. Restarted with the new KEK, everything is ready again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.layout import DeployLayout
from splitvault.cli import main
from tests.conftest import Deployment, DigitsFixture
from tests.support.deployments import copy_deployment
from tests.support.ports import ReservedPort
from tests.support.processes import TierProcess, start_public, start_tier
from tests.support.stack import cli, https, image_request, poll, tier_env

pytestmark = pytest.mark.slow

SKIP = ("minilm", "nested", "digits-label")


@pytest.fixture
def started() -> Iterator[list[TierProcess]]:
    processes: list[TierProcess] = []
    yield processes
    for process in reversed(processes):
        process.stop()
        print("\n".join(process.lines[-30:]))  # shown by pytest only when a test failed


def _private(
    layout: DeployLayout, started: list[TierProcess], port: int, kek: Path | None = None
) -> TierProcess:
    args = ["serve", "private", "--deploy", str(layout.root), "--port", str(port)]
    args += ["--kek-file", str(kek)] if kek else []
    env = {**tier_env(), "SPLITVAULT_PRIVATE_METRICS_PORT": "0"}
    env["SPLITVAULT_PRIVATE_GRACE_PERIOD_S"] = "1"
    started.append(start_tier(args, "private_tier_listening", env=env))
    return started[-1]


def test_private_tier_with_a_stale_kek_is_not_healthy(
    deployment: Deployment, digits_model: DigitsFixture, tmp_path: Path, started: list[TierProcess]
) -> None:
    layout = copy_deployment(deployment.layout, tmp_path / "deploy", skip_models=SKIP)
    old_kek = tmp_path / "old-kek"
    shutil.copy(layout.kek, old_kek)
    assert main(["keys", "rotate-kek", "--deploy", str(layout.root)]) == 0
    with ReservedPort() as reserved:
        private = _private(layout, started, reserved.port, kek=old_kek)
        (event,) = private.wait_for_events("private_tier_not_serving")
        assert list(event["failed"]) == ["digits"]

        probe = cli("health", "private", "--address", reserved.address, deploy=layout.root)
        assert probe.returncode == 1, probe.stdout + probe.stderr
        lines = probe.stdout.splitlines()
        assert lines[0] == "not ready: 1 model(s) failed to load"
        assert lines[1].startswith("  digits: model 'digits': ") and "KEK" in lines[1]
        live = cli("health", "private", "--address", reserved.address, "--live", deploy=layout.root)
        assert live.returncode == 0, live.stdout + live.stderr

        public = start_public(layout.root, reserved.port, env=tier_env())
        started.append(public)
        url = f"https://localhost:{public.port}"
        with https(layout, public.port, deployment.api_key) as http:
            ready = http.get("/v2/health/ready")
            assert (ready.status_code, ready.json()["error"]) == (503, "private tier not serving")
            (model,) = http.get("/v2/models").json()["models"]
            assert (model["ready"], model["reason"]) == (
                False,
                "the private tier could not load this model",
            )
            body = image_request(digits_model.data.test_x[:1])
            assert http.post("/v2/models/digits/infer", json=body).status_code == 503
        health = cli("health", "public", "--url", url, deploy=layout.root)
        assert health.returncode == 1
        assert health.stdout.splitlines()[0] == "not ready: private tier not serving"

        private.stop()
        _private(layout, started, reserved.port)  # the current KEK
        probe = cli("health", "private", "--address", reserved.address, deploy=layout.root)
        assert (probe.returncode, probe.stdout.strip()) == (0, "ready")
        with https(layout, public.port, deployment.api_key) as http:
            poll(lambda: http.get("/v2/health/ready").status_code == 200, "readiness", 30)
