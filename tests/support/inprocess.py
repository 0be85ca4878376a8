"""A real private tier (``build_server``: gRPC over mutual TLS, servicer, batcher, back stages)
on an event loop in a thread of the test process, with a back-stage pool that holds each batch
until the test opens its gate: what waits in the batcher, and what shares a batch, is then up
to the test, not to the machine's speed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from private_core.server import PrivateServer, build_server
from private_core.settings import PrivateSettings

T = TypeVar("T")
P = ParamSpec("P")


class GatedPool(ThreadPoolExecutor):
    """The private tier's back-stage pool: counts each batch handed to it, runs it once
    ``gate`` is open."""

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix)
        self.gate = threading.Event()
        self.gate.set()
        self.handed = threading.Semaphore(0)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        self.handed.release()
        gate = self.gate

        def held() -> T:
            gate.wait(120)
            return fn(*args, **kwargs)

        return super().submit(held)

    @contextlib.contextmanager
    def holding(self) -> Iterator[threading.Semaphore]:
        """Hold every batch for the block; yields a semaphore released once per batch."""
        self.handed = threading.Semaphore(0)
        self.gate.clear()
        try:
            yield self.handed
        finally:
            self.gate.set()


class ThreadedPrivateTier:
    """``build_server`` on its own event loop in a thread; ``stop`` drains and joins it."""

    def __init__(self, settings: PrivateSettings) -> None:
        self._ready: Future[PrivateServer] = Future()
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(settings),))
        self._thread.start()
        self.server = self._ready.result(timeout=120)

    async def _serve(self, settings: PrivateSettings) -> None:
        try:
            server = await build_server(settings)
        except BaseException as error:
            self._ready.set_exception(error)
            return
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set_result(server)
        await self._stopping.wait()
        await server.stop(grace_s=5.0)

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the in-process private tier did not stop"
