"""A real, throwaway ``redis-server`` for tests: a Unix socket in a temp dir, no persistence.

redis-server has no way to report an ephemeral TCP port, so it listens on no TCP port at all
(``--port 0``) and only on ``DIR/redis.sock``: no port is picked and bound later, and a
restart keeps the same address.

In a test module::

    redis_server = redis_server_fixture(scope="module")

    async def test_something(redis_server: RedisServer) -> None:
        limiter = RedisRateLimiter(redis_server.url)

Tests using it skip (with the reason) when ``redis-server`` is not installed;
``scripts/test.sh`` installs it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

START_TIMEOUT_S = 10.0
MISSING = "redis-server is not installed (apt-get install redis-server; scripts/test.sh does it)"

Scope = Literal["session", "package", "module", "class", "function"]


def _ping(path: Path) -> bool:
    """A bare RESP PING, so the helper does not depend on the client library under test: PONG,
    or NOAUTH from a server that wants a password, means it is up."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``stop`` and ``start`` again keep the same socket.
    ``password``: required of every client (``requirepass``), as the private tier's store is."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise FileNotFoundError(MISSING)
        self.executable = executable
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``unix://DIR/redis.sock?db=0``."""
        return f"unix://{self.socket}?db=0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.process is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [self.executable, "--port", "0", "--unixsocket", str(self.socket)]
        command += ["--unixsocketperm", "700", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.directory)]
        if self.password is not None:
            command += ["--requirepass", self.password]
        log = (self.directory / "redis.log").open("ab")
        with log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ping(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on {self.socket}:\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_server_fixture(
    scope: Scope = "module", name: str = "redis_server"
) -> Callable[..., Iterator[RedisServer]]:
    """A pytest fixture called ``name`` giving a started ``RedisServer``, stopped after ``scope``."""

    @pytest.fixture(scope=scope, name=name)
    def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
        if shutil.which("redis-server") is None:
            pytest.skip(MISSING)
        with RedisServer(tmp_path_factory.mktemp("redis")) as server:
            yield server

    return redis_server
