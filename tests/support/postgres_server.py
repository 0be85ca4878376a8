"""A real, throwaway PostgreSQL server for tests: ``initdb`` in a temp folder, Unix socket only.

The server listens on no TCP address (``-c listen_addresses=''``), only on a socket in its
folder, so no port is picked and a restart keeps the same address. PostgreSQL refuses to run as
root: under root the folder is given to the ``postgres`` user and the server runs as it
(``setpriv``); the tests connect over the socket as the superuser ``splitvault`` (trust
authentication, which only the socket's folder permissions guard: a test server only).

In a test module::

    postgres_server = postgres_server_fixture(scope="module")

    def test_something(postgres_server: PostgresServer) -> None:
        dsn = postgres_server.create_database("keys")

Tests using it skip (with the reason) when PostgreSQL is not installed; ``scripts/test.sh``
installs Debian's ``postgresql``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.redis_server import Scope

START_TIMEOUT_S = 30.0
SUPERUSER = "splitvault"
MISSING = "PostgreSQL is not installed (apt-get install postgresql; scripts/test.sh does it)"


def _bin_dir() -> Path | None:
    """The folder of ``initdb`` and ``postgres``: on PATH, else Debian's versioned folder."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


class PostgresServer:
    """One ``postgres`` process on ``DIR/data``; ``stop`` and ``start`` keep the same socket."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise FileNotFoundError(MISSING)
        self.bin_dir = bin_dir
        # Not under pytest's tmp_path: the postgres user must be able to reach the folder.
        self.directory = Path(tempfile.mkdtemp(prefix="splitvault-pg-"))
        self.data = self.directory / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self._user: list[str] = []
        if os.getuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            # setpriv execs postgres itself, so signals reach it (runuser would stand between)
            self._user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        self._run([str(bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-A", "trust"])

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq DSN for database ``dbname`` over the socket."""
        return f"host={self.directory} dbname={dbname} user={SUPERUSER} connect_timeout=5"

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a test's own name, not input
        return self.dsn(name)

    def start(self) -> PostgresServer:
        """Start the server and wait until it accepts connections."""
        if self.process is not None:
            return self
        command = [*self._user, str(self.bin_dir / "postgres"), "-D", str(self.data)]
        command += ["-k", str(self.directory), "-c", "listen_addresses=", "-c", "fsync=off"]
        with (self.directory / "postgres.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.directory / "postgres.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres did not start in {self.directory}:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are cut, as in an outage), then wait."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def remove(self) -> None:
        """Stop and delete the folder."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _ready(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(
            [*self._user, *command], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {result.stdout}{result.stderr}")

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def postgres_server_fixture(
    scope: Scope = "module", name: str = "postgres_server"
) -> Callable[..., Iterator[PostgresServer]]:
    """A pytest fixture called ``name`` giving a started ``PostgresServer``, removed after
    ``scope``."""

    @pytest.fixture(scope=scope, name=name)
    def postgres_server() -> Iterator[PostgresServer]:
        if _bin_dir() is None:
            pytest.skip(MISSING)
        with PostgresServer() as server:
            yield server

    return postgres_server
