"""Helpers for tests that run their own tiers on a copy of the session deployment."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import numpy.typing as npt

from shared.layout import PRIVATE_IDENTITY, DeployLayout
from tests.support import deployments

REPO_ROOT = Path(__file__).resolve().parents[2]
THREADS = {"SPLITVAULT_PRIVATE_TORCH_THREADS": "1", "SPLITVAULT_PUBLIC_TORCH_THREADS": "1"}
# One thread for lone requests too: two OpenMP threads on a host shared with other test runs
# can be many times slower than one (tests/integration/test_compute_threads.py sets two).
THREADS |= {
    "SPLITVAULT_PRIVATE_LONE_REQUEST_THREADS": "1",
    "SPLITVAULT_PUBLIC_LONE_REQUEST_THREADS": "1",
}
PROTECTION = "SPLITVAULT_PUBLIC_PROTECTION__"
# Limits out of the way and a monitor that only records, so that the many requests of one test
# key are neither throttled nor blocked; tests about protection override what they exercise.
OPEN_PROTECTION: dict[str, object] = {
    "key_limits__rate_per_s": 100000,
    "key_limits__burst": 100000,
    "key_limits__daily_quota": 10_000_000,
    "ip_limits__rate_per_s": 100000,
    "ip_limits__burst": 100000,
    "monitor_action": "record",
    # Every test client is 127.0.0.1, so all of a tier's keys would form one key group.
    "groups_enabled": False,
}


# The private tier's activation monitor only records too: tests send zeros and noise on purpose.
PRIVATE_MONITOR_RECORDS = {"SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__ACTION": "record"}


def tier_env(**protection: object) -> dict[str, str]:
    """The environment of a test tier: one torch thread per tier, ``OPEN_PROTECTION`` and
    ``PRIVATE_MONITOR_RECORDS``, with ``protection`` overriding it (``key_limits__burst=5``;
    dicts and lists become JSON)."""
    settings = {**OPEN_PROTECTION, **protection}
    env = {**THREADS, **PRIVATE_MONITOR_RECORDS}
    for name, value in settings.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[f"{PROTECTION}{name.upper()}"] = text
    return env


def copy_deployment(source: Path, destination: Path, skip_models: set[str]) -> DeployLayout:
    """A copy of ``source`` without ``skip_models`` and without the public tier's state."""
    return deployments.copy_deployment(
        DeployLayout(source), destination, skip_models=skip_models, keep_public_state=False
    )


def https(layout: DeployLayout, port: int, key: str | None = None, **kwargs: Any) -> httpx.Client:
    """An HTTPS client for a public tier of ``layout`` on ``port``, sending ``key``."""
    context = ssl.create_default_context(cafile=str(layout.public.ca_cert))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kwargs.setdefault("timeout", 30.0)
    return httpx.Client(
        base_url=f"https://localhost:{port}", verify=context, headers=headers, **kwargs
    )


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cli(*args: str, deploy: Path) -> subprocess.CompletedProcess[str]:
    """``python -m splitvault ARGS --deploy DEPLOY``."""
    command = [sys.executable, "-m", "splitvault", *args, "--deploy", str(deploy)]
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def poll(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
    """Wait until ``condition()``; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def image_request(images: npt.NDArray[np.float32], **extra: Any) -> dict[str, Any]:
    """An Open Inference Protocol v2 request for the digits models: ``images`` (N, 1, 8, 8) as
    the FP32 ``image`` input; ``extra`` adds top-level fields (``id``, ``parameters``)."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    tensor = {
        "name": "image",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    return {"inputs": [tensor], **extra}


def private_channel(layout: DeployLayout, port: int, tls: Path) -> grpc.Channel:
    """A channel to a private tier of ``layout`` on loopback ``port``, presenting the client
    certificate in ``tls`` (``client.crt``, ``client.key``): a direct caller, as whoever holds
    a public replica's certificate is. Its own subchannel pool: its own TLS handshake."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.public.ca_cert.read_bytes(),
        private_key=(tls / "client.key").read_bytes(),
        certificate_chain=(tls / "client.crt").read_bytes(),
    )
    options = [
        ("grpc.ssl_target_name_override", PRIVATE_IDENTITY),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)
