"""``docker compose up`` as shipped, for real: build the image, start the shipped compose.yaml on
a fresh ``splitvault init`` folder with the digits demo packed, and use it from the host.

Checks: both healthchecks pass; the SDK over HTTPS answers like the unsplit model (the
watermark is off by default, so answers equal the unsplit model's top 3 up to FP16 transport
and 4-decimal rounding); the private port is published nowhere; the private container reaches
nothing outside its internal network (a listener this test starts on a network of its own);
a key made with ``docker compose exec public splitvault keys create`` works; ``down -v`` leaves
nothing behind (checked when the module's stack is torn down, after every test in any order).
Prints the image size, build time and time to healthy.

Only what a host cannot grant is overridden: ``compose.memlock.yaml`` when the engine refuses
``memlock: -1``. The torch wheel comes from the default package index when the base image
offers local wheels (``PIP_FIND_LINKS``, as on the CI machines whose engine has no access to
the PyTorch index), else from the Dockerfile's CPU index; ``SPLITVAULT_TEST_TORCH_INDEX_URL``
overrides that choice. Skipped, with the reason, where no Docker engine answers.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from splitvault_client import Client

from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy, WatermarkConfig
from splitvault.demo import digits
from splitvault.packing.pack import pack_spec
from splitvault.packing.spec import ModelSpec
from tests.support.netguard.sitecustomize import ALLOW_ENV

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
MEMLOCK_OVERRIDE = Path(__file__).with_name("compose.memlock.yaml")
BASE_IMAGE = "python:3.11-slim"
CACHE_TAG = "splitvault:compose-test"  # keeps the build's layers cached between runs
STAND_IN_UID = 10002  # the deployment's owner when the test runs as root (not the image's 10001)
BUILD_TIMEOUT_S, UP_TIMEOUT_S, HEALTHY_TIMEOUT_S = 1800, 300, 300
SECRET = re.compile(r"sv_k_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


def _run(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``command``; its output, or a failure that shows it."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, check=False, cwd=ROOT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{output}"
    return result.stdout


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False, timeout=30
    )
    return ["docker", "compose"] if probe.returncode == 0 else None


def _engine_or_skip() -> list[str]:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on this machine")
    info = subprocess.run(
        ["docker", "info"], capture_output=True, text=True, check=False, timeout=60
    )
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        pytest.skip(f"no Docker engine answers `docker info` ({reason})")
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor 'docker compose' is installed")
    return compose


def _torch_index() -> str:
    """Empty (the default index) where the base image offers local wheels, else the CPU index."""
    chosen = os.environ.get("SPLITVAULT_TEST_TORCH_INDEX_URL")
    if chosen is not None:
        return chosen
    env = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{json .Config.Env}}", BASE_IMAGE],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    local = env.returncode == 0 and any(
        item.startswith("PIP_FIND_LINKS=") for item in json.loads(env.stdout)
    )
    return "" if local else "https://download.pytorch.org/whl/cpu"


def _memlock_granted(image: str) -> bool:
    """Whether this engine may start a container with the shipped ``memlock: -1``."""
    probe = subprocess.run(
        ["docker", "run", "--rm", "--ulimit", "memlock=-1:-1", "--entrypoint", "true", image],
        capture_output=True,
        check=False,
        timeout=120,
    )
    return probe.returncode == 0


def _unsplit_top_k(spec: ModelSpec, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        logits = spec.module(torch.from_numpy(x)).double()
    scores, indices = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    return indices.numpy(), scores.numpy()


@dataclass
class Stack:
    """The running compose project, how to drive it, and what it took to get there."""

    compose: list[str]
    project: str
    env: dict[str, str]
    layout: DeployLayout
    spec: ModelSpec
    test_x: np.ndarray
    image: str
    timings: dict[str, float] = field(default_factory=dict)
    cleanup: list[list[str]] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 120) -> str:
        return _run(
            [*self.compose, "-p", self.project, *self.files, *args], timeout=timeout, env=self.env
        )

    @property
    def files(self) -> list[str]:
        found = ["-f", str(COMPOSE)]
        if self.env.get("SV_TEST_MEMLOCK_OVERRIDE") == "1":
            found += ["-f", str(MEMLOCK_OVERRIDE)]
        return found

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).strip()

    def inspect(self, name: str) -> dict[str, Any]:
        loaded: list[dict[str, Any]] = json.loads(_run(["docker", "inspect", name], timeout=60))
        return loaded[0]

    def health(self, service: str) -> str:
        state = self.inspect(self.container(service))["State"]
        return str(state.get("Health", {}).get("Status", state["Status"]))

    def public_url(self) -> str:
        host, _, port = self.run("port", "public", "8443").strip().rpartition(":")
        assert host == "127.0.0.1", host
        return f"https://127.0.0.1:{port}"

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
            out = _run(["docker", *kind, "-q", "--filter", label], timeout=60)
            found += [f"{kind[0]} {item}" for item in out.split()]
        return found

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "--timeout", "30", timeout=180)


def _prepare_deployment(root: Path) -> tuple[DeployLayout, ModelSpec, np.ndarray]:
    """``splitvault init`` as a user runs it, then the digits demo packed (top 3, FP16)."""
    _run([sys.executable, "-m", "splitvault", "init", str(root)], timeout=120)
    layout = DeployLayout(root)
    data = digits.load_data()
    spec = digits.spec_for(digits.train(data, epochs=8), data)
    provider = LocalFileKeyProvider.load(layout.kek)
    pack_spec(
        spec,
        name="digits",
        split=digits.SPLIT,
        layout=layout,
        provider=provider,
        policy=TopKPolicy(k=3),
        show_progress=False,
        watermark=WatermarkConfig(enabled=False),  # answers are compared with the unsplit model
    )
    return layout, spec, data.test_x


def _owner(root: Path) -> tuple[int, int]:
    """The uid/gid the containers run as: whoever owns the key files ``init`` wrote with mode
    0600 (README: ``SPLITVAULT_UID=$(id -u)``). As root, hand the folder to a stand-in user."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    for path in [root, *root.rglob("*")]:
        os.chown(path, STAND_IN_UID, STAND_IN_UID, follow_symlinks=False)
    return STAND_IN_UID, STAND_IN_UID


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    compose = _engine_or_skip()
    project = f"svtest{os.getpid()}{secrets.token_hex(3)}"
    image = f"splitvault:{project}"
    layout, spec, test_x = _prepare_deployment(tmp_path_factory.mktemp("compose") / "deploy")
    uid, gid = _owner(layout.root)
    env = {
        **os.environ,
        "DOCKER_BUILDKIT": "0",
        "SPLITVAULT_DEPLOY": str(layout.root),
        "SPLITVAULT_UID": str(uid),
        "SPLITVAULT_GID": str(gid),
        "SPLITVAULT_PUBLISH": "127.0.0.1:0",
        "SPLITVAULT_IMAGE": image,
    }
    running = Stack(compose, project, env, layout, spec, test_x, image)
    try:
        started = time.monotonic()
        build_arg = f"TORCH_INDEX_URL={_torch_index()}"
        _run(
            ["docker", "build", "--build-arg", build_arg, "-t", CACHE_TAG, "-t", image, "."],
            timeout=BUILD_TIMEOUT_S,
            env=env,
        )
        running.timings["build_s"] = time.monotonic() - started
        running.timings["image_mb"] = running.inspect(image)["Size"] / 1e6
        if not _memlock_granted(image):
            env["SV_TEST_MEMLOCK_OVERRIDE"] = "1"
        started = time.monotonic()
        running.run("up", "-d", "--no-build", timeout=UP_TIMEOUT_S)
        deadline = started + HEALTHY_TIMEOUT_S
        while {running.health(s) for s in ("private", "public")} != {"healthy"}:
            assert time.monotonic() < deadline, running.run("logs", "--no-color", "--tail", "40")
            time.sleep(1)
        running.timings["healthy_s"] = time.monotonic() - started
        print(
            f"\ncompose up: image {running.timings['image_mb']:.0f} MB, build "
            f"{running.timings['build_s']:.0f} s, healthy after "
            f"{running.timings['healthy_s']:.0f} s, memlock override: "
            f"{env.get('SV_TEST_MEMLOCK_OVERRIDE') == '1'}"
        )
        yield running
        for command in reversed(running.cleanup):
            _run(command, timeout=120)
        running.cleanup.clear()
        running.down()
        assert running.leftovers() == [], "`down -v` left these behind"
    finally:
        for command in reversed(running.cleanup):
            subprocess.run(command, capture_output=True, check=False, timeout=120)
        if running.leftovers():
            running.down()
        subprocess.run(["docker", "rmi", image], capture_output=True, check=False, timeout=120)


def test_both_tiers_are_healthy(stack: Stack) -> None:
    assert stack.health("private") == "healthy"
    assert stack.health("public") == "healthy"


def test_a_key_made_with_exec_gets_the_unsplit_models_answers(stack: Stack) -> None:
    created = stack.run(
        "exec",
        "-T",
        "public",
        "splitvault",
        "keys",
        "create",
        "--deploy",
        "/deploy",
        "--name",
        "compose-test",
    )
    match = SECRET.search(created)
    assert match, created
    x = stack.test_x[:64]
    expected_idx, expected_scores = _unsplit_top_k(stack.spec, x, 3)
    with Client(stack.public_url(), api_key=match.group(0), ca=stack.layout.public.ca_cert) as sdk:
        assert sdk.ready()
        assert sdk.accept_terms(sdk.terms().version).accepted
        prediction = sdk.predict("digits", x)
    assert prediction.scores is not None
    np.testing.assert_array_equal(prediction.indices, expected_idx)
    np.testing.assert_allclose(prediction.scores, expected_scores, atol=2e-3)
    listed = stack.run("exec", "-T", "public", "splitvault", "keys", "list", "--deploy", "/deploy")
    assert "compose-test" in listed  # kept in the public state volume


def test_the_private_port_is_published_nowhere(stack: Stack) -> None:
    private = stack.inspect(stack.container("private"))
    assert not private["HostConfig"]["PortBindings"]
    assert not any(private["NetworkSettings"]["Ports"].values())
    networks = list(private["NetworkSettings"]["Networks"])
    assert networks == [f"{stack.project}_backend"]
    assert stack.inspect(networks[0])["Internal"] is True
    public = stack.inspect(stack.container("public"))["NetworkSettings"]["Ports"]
    assert {port: [b["HostIp"] for b in bound] for port, bound in public.items() if bound} == {
        "8443/tcp": ["127.0.0.1"]
    }


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def test_the_private_tier_reaches_nothing_outside_its_network(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    network, listener = f"{stack.project}-egress", f"{stack.project}-listener"
    label = f"com.docker.compose.project={stack.project}"  # so that leftovers() would see them
    _run(["docker", "network", "create", "--label", label, network], timeout=60)
    stack.cleanup.append(["docker", "network", "rm", network])
    # The connect guard lets this process reach the network the test made, and nothing else.
    subnet = _run(
        ["docker", "network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", network],
        timeout=60,
    ).strip()
    allowed = os.environ.get(ALLOW_ENV, "")
    monkeypatch.setenv(ALLOW_ENV, ",".join(filter(None, [allowed, subnet])))
    _run(
        [
            "docker",
            "run",
            "-d",
            "--name",
            listener,
            "--label",
            label,
            "--network",
            network,
            "--read-only",
            "--entrypoint",
            "python",
            stack.image,
            "-m",
            "http.server",
            "8000",
        ],
        timeout=120,
    )
    stack.cleanup.append(["docker", "rm", "-f", listener])
    address = stack.inspect(listener)["NetworkSettings"]["Networks"][network]["IPAddress"]
    deadline = time.monotonic() + 60
    while not _reachable(address, 8000):  # the host reaches it: the listener is up
        assert time.monotonic() < deadline, "the listener never answered the host"
        time.sleep(0.5)
    attempt = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, 8000), timeout=5)\n"
        "except OSError as error:\n"
        "    sys.exit(f'blocked: {error}')\n"
    )
    result = subprocess.run(
        [
            *stack.compose,
            "-p",
            stack.project,
            *stack.files,
            "exec",
            "-T",
            "private",
            "python",
            "-c",
            attempt,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=stack.env,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "blocked" in result.stderr, result.stdout + result.stderr
