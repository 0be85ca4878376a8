"""Run both tiers as local subprocesses (demo, tests, benchmarks), reading their JSON logs."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TierProcess:
    """A running tier: its process, the ports it bound and every log line so far."""

    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None
    # The internal metrics listener's port, from the ready event (None: no listener).
    metrics_port: int | None = None

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:PORT/metrics`` of the tier's metrics listener."""
        if self.metrics_port is None:
            raise RuntimeError("this tier runs no metrics listener")
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def events(self) -> list[dict[str, Any]]:
        """Log lines that are JSON objects."""
        parsed = []
        for line in list(self.lines):
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
        return parsed

    def wait_for_events(
        self, name: str, *, count: int = 1, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """The events called ``name``, once at least ``count`` of them have been read.

        A thread reads the log: an event the tier logged before it answered a request may reach
        ``lines`` after the answer reached the caller, so callers wait instead of looking once.
        """
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            found[:] = [e for e in self.events() if e.get("event") == name]
            return len(found) >= count

        wait_for(enough, timeout=timeout, what=f"{count} {name!r} log event(s)")
        return found

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def start_tier(
    args: Sequence[str],
    ready_event: str,
    *,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> TierProcess:
    """Run ``python -m splitvault ARGS`` and wait for the JSON log event ``ready_event``.

    The event must carry the bound ``port`` (and may carry ``metrics_port``); stderr and
    stdout are merged and kept. ``cwd``: another checkout of the code to run (benchmarks that
    compare two revisions); this one by default.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "splitvault", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd or Path(__file__).resolve().parents[1],
    )
    lines: list[str] = []
    found: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == ready_event:
                found.put(event)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ready = found.get(timeout=0.2)
            metrics_port = ready.get("metrics_port")
            return TierProcess(
                process,
                int(ready["port"]),
                lines,
                reader,
                None if metrics_port is None else int(metrics_port),
            )
        except queue.Empty:
            if process.poll() is not None:
                break
    process.kill()
    process.wait(5)
    reader.join(5)
    if process.stdout is not None:
        process.stdout.close()
    raise RuntimeError(f"{args[:2]} did not become ready:\n" + "\n".join(lines[-40:]))


def start_private(
    deploy: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> TierProcess:
    """The private tier on a free loopback port (from the checkout ``cwd``, see ``start_tier``)."""
    # A free metrics port too: several private tiers may run on one host (tests, demo).
    return start_tier(
        ["serve", "private", "--deploy", str(deploy), "--port", "0"],
        "private_tier_listening",
        env={"SPLITVAULT_PRIVATE_METRICS_PORT": "0", **(env or {})},
        cwd=cwd,
    )


def start_public(
    deploy: Path, private_port: int, *, env: dict[str, str] | None = None, extra: Sequence[str] = ()
) -> TierProcess:
    """The public tier on a free loopback port, talking to ``127.0.0.1:private_port``; its
    metrics listener on another free loopback port (``TierProcess.metrics_port``)."""
    process = start_tier(
        [
            "serve",
            "public",
            "--deploy",
            str(deploy),
            "--port",
            "0",
            "--private",
            f"127.0.0.1:{private_port}",
            *extra,
        ],
        "public_tier_listening",
        env={"SPLITVAULT_PUBLIC_METRICS_PORT": "0", **(env or {})},
    )
    wait_for(
        lambda: any(e.get("event") == "public_tier_ready" for e in process.events()),
        what="public tier startup",
    )
    return process


def wait_for(condition: Any, *, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition()`` until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def start_both(
    deploy: Path, stack: ExitStack, *, env: dict[str, str] | None = None
) -> tuple[TierProcess, TierProcess]:
    """The private, then the public tier on free loopback ports, both with ``env``; each is
    stopped when ``stack`` closes. Returns (public, private)."""
    private = start_private(deploy, env=env)
    stack.callback(private.stop)
    public = start_public(deploy, private.port, env=env)
    stack.callback(public.stop)
    return public, private
