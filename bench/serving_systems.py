"""The servers ``serving_comparison.py`` measures: start one, hand back its URL, stop it.

Each system runs as real processes on loopback, behind TLS with the deployment's public-tier
certificate (the baselines use the same certificate), and is stopped before the next starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.layout import DeployLayout
from splitvault.launcher import start_private, start_public

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINES = REPO_ROOT / "bench" / "baselines"
HIGH_RATE = "1000000"  # limits far above anything two cores can serve
HIGH_QUOTA = "1000000000"
PROTECTED_ENV = {
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__RATE_PER_S": HIGH_RATE,
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__BURST": HIGH_RATE,
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__DAILY_QUOTA": HIGH_QUOTA,
    "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__RATE_PER_S": HIGH_RATE,
    "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__BURST": HIGH_RATE,
    "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__DAILY_QUOTA": HIGH_QUOTA,
    "SPLITVAULT_PUBLIC_PROTECTION__MONITOR_ACTION": "record",
    # LitServe's default request timeout is 30 s; give splitvault's private call the same.
    "SPLITVAULT_PUBLIC_REQUEST_TIMEOUT_S": "30",
}
OPEN_ENV = {
    **PROTECTED_ENV,
    "SPLITVAULT_PUBLIC_PROTECTION__REQUIRE_API_KEY": "false",
    "SPLITVAULT_PUBLIC_PROTECTION__AUDIT_ENABLED": "false",
    "SPLITVAULT_PUBLIC_PROTECTION__MONITOR_ENABLED": "false",
}


@dataclass(frozen=True)
class SystemInfo:
    """A system's key (flag value), its label in tables and plots, and how it was set up."""

    key: str
    label: str
    note: str


@dataclass(frozen=True)
class Endpoint:
    """A running system: where to send requests, with which headers, and its process ids."""

    base_url: str
    headers: dict[str, str]
    pids: list[int]
    verify: ssl.SSLContext
    metrics_urls: tuple[str, ...] = ()  # the tiers' Prometheus listeners (splitvault only)


@dataclass(frozen=True)
class ServerConfig:
    """What every system is started with."""

    layout: DeployLayout
    workdir: Path
    models: tuple[str, ...]
    digits_state: Path
    threads: int
    private_threads: int
    public_threads: int
    litserve_batch: int
    litserve_timeout_s: float
    api_key: str
    private_env: dict[str, str] = field(default_factory=dict)
    public_env: dict[str, str] = field(default_factory=dict)
    base_tree: Path | None = None  # splitvault-base: the source tree it runs (a copy of a commit)

    def verify(self) -> ssl.SSLContext:
        """A TLS context that trusts only the deployment's CA."""
        return ssl.create_default_context(cafile=str(self.layout.public.ca_cert))


def systems(config: ServerConfig) -> dict[str, SystemInfo]:
    """Every system this module can start, by key."""
    threads = f"{config.threads} torch threads"
    split = f"private {config.private_threads} + public {config.public_threads} torch threads"
    batching = f"max_batch_size {config.litserve_batch}, batch_timeout {config.litserve_timeout_s * 1000:g} ms"
    return {
        "fastapi": SystemInfo(
            "fastapi", "plain FastAPI", f"uvicorn, 1 process, sync endpoint, HTTPS; {threads}"
        ),
        "litserve": SystemInfo(
            "litserve",
            "LitServe",
            f"{batching}, 1 API server + 1 worker per model, HTTPS; {threads}",
        ),
        "splitvault": SystemInfo(
            "splitvault",
            "splitvault (protected)",
            "HTTPS + mTLS gRPC; API key, terms accepted, rate limits set high, monitor "
            f"action 'record', audit on; {split}",
        ),
        "splitvault-fixed": SystemInfo(
            "splitvault-fixed",
            "splitvault (protected, fixed threads)",
            "as splitvault (protected), but a lone request also runs on torch_threads "
            f"(lone_request_threads = torch_threads: the threading before issue 17); {split}",
        ),
        "splitvault-unbatched": SystemInfo(
            "splitvault-unbatched",
            "splitvault (protected, front unbatched)",
            "as splitvault (protected), but each request's front stage runs alone "
            f"(front_batching.max_batch_size = 1: the public tier before front batching); {split}",
        ),
        "splitvault-base": SystemInfo(
            "splitvault-base",
            "splitvault (protected, base commit)",
            "as splitvault (protected), run from another source tree (--base-tree: the code "
            f"before a change, for before/after in the same rounds); {split}",
        ),
        "splitvault-open": SystemInfo(
            "splitvault-open",
            "splitvault (protections off)",
            f"HTTPS + mTLS gRPC; require_api_key=false, audit off, monitor off; {split}",
        ),
    }


SPLITVAULT_KEYS = (
    "splitvault",
    "splitvault-open",
    "splitvault-fixed",
    "splitvault-unbatched",
    "splitvault-base",
)


@contextmanager
def running(key: str, config: ServerConfig) -> Iterator[Endpoint]:
    """Start system ``key``, yield its endpoint once it answers, stop it on exit."""
    if key in ("fastapi", "litserve"):
        with _baseline(key, config) as endpoint:
            yield endpoint
    elif key in SPLITVAULT_KEYS:
        tree = None
        if key == "splitvault-base":
            if config.base_tree is None:
                raise ValueError("splitvault-base needs a source tree (--base-tree)")
            tree = config.base_tree
        with _splitvault(
            key != "splitvault-open",
            config,
            fixed=key == "splitvault-fixed",
            unbatched=key == "splitvault-unbatched",
            tree=tree,
        ) as found:
            yield found
    else:
        raise ValueError(f"unknown system {key!r}")


@contextmanager
def _splitvault(
    protected: bool,
    config: ServerConfig,
    *,
    fixed: bool = False,
    unbatched: bool = False,
    tree: Path | None = None,
) -> Iterator[Endpoint]:
    """Both tiers; ``fixed``: a lone request gets no more threads than a loaded one;
    ``unbatched``: the public tier runs each request's front stage alone; ``tree``: the
    source tree they run (default: this one)."""
    private_env = {"SPLITVAULT_PRIVATE_TORCH_THREADS": str(config.private_threads)}
    public_env = {
        **(PROTECTED_ENV if protected else OPEN_ENV),
        "SPLITVAULT_PUBLIC_TORCH_THREADS": str(config.public_threads),
    }
    if fixed:
        private_env["SPLITVAULT_PRIVATE_LONE_REQUEST_THREADS"] = str(config.private_threads)
        public_env["SPLITVAULT_PUBLIC_LONE_REQUEST_THREADS"] = str(config.public_threads)
    # What makes the variant wins over --public-env (which every splitvault system gets).
    variant = {"SPLITVAULT_PUBLIC_FRONT_BATCHING__MAX_BATCH_SIZE": "1"} if unbatched else {}
    private = start_private(config.layout.root, env={**private_env, **config.private_env}, cwd=tree)
    try:
        public = start_public(
            config.layout.root,
            private.port,
            env={**public_env, **config.public_env, **variant},
            cwd=tree,
        )
    except BaseException:
        private.stop()
        raise
    headers = {"Authorization": f"Bearer {config.api_key}"} if protected else {}
    try:
        yield Endpoint(
            f"https://localhost:{public.port}",
            headers,
            [public.process.pid, private.process.pid],
            config.verify(),
            (public.metrics_url, private.metrics_url),
        )
    finally:
        public.stop()
        private.stop()


@contextmanager
def _baseline(key: str, config: ServerConfig) -> Iterator[Endpoint]:
    port = free_port()
    tls = config.layout.public.tls
    command = [
        sys.executable,
        str(BASELINES / ("plain_fastapi.py" if key == "fastapi" else "litserve_server.py")),
        f"--port={port}",
        f"--threads={config.threads}",
        f"--certfile={tls / 'server.crt'}",
        f"--keyfile={tls / 'server.key'}",
    ]
    if "digits" in config.models:
        command.append(f"--digits-state={config.digits_state}")
    if "minilm" in config.models:
        command.append("--minilm")
    if key == "litserve":
        command += [
            f"--max-batch-size={config.litserve_batch}",
            f"--batch-timeout={config.litserve_timeout_s}",
        ]
    log_path = config.workdir / f"{key}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=config.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group: LitServe's workers stop with it
        )
    try:
        url = f"https://localhost:{port}"
        _wait_healthy(f"{url}/health", config.verify(), process, log_path)
        yield Endpoint(url, {}, [process.pid], config.verify())
    finally:
        _stop_group(process)


def _wait_healthy(
    url: str, verify: ssl.SSLContext, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(url, verify=verify, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{url} did not become healthy:\n{tail}")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    with contextlib.suppress(ProcessLookupError):  # workers left behind by their parent
        os.killpg(process.pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port free on loopback right now (LitServe refuses port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` and all their descendants (Linux ``/proc``)."""
    stats = _proc_stats()
    return sum(stats[pid][1] for pid in _tree(pids, stats))


def _tree(pids: list[int], stats: dict[int, tuple[int, float]]) -> list[int]:
    """``pids`` and all their descendants that are still alive."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    found, stack, seen = [], list(pids), set[int]()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


@contextmanager
def suspended(pids: list[int]) -> Iterator[None]:
    """Stop ``pids`` and their descendants (SIGSTOP) for the block, then continue them.

    Idle servers are not all idle: LitServe's worker processes poll their queues. Stopping the
    systems that are not being measured keeps them from taking CPU from the one that is.
    """
    tree = _tree(pids, _proc_stats())
    for pid in tree:
        _signal(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in tree:
            _signal(pid, signal.SIGCONT)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        os.kill(pid, signum)


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) for every process we can read."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return stats


def environment_pairs(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` flags as a dict (``ValueError`` on a malformed one)."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def mapping_note(env: Mapping[str, str]) -> str:
    """Extra environment passed to a tier, for the conditions line."""
    return ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "none"
