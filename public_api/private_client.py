"""The public tier's client of the private tier: one reused mTLS channel, deadlines, health.

Requests ready at the same moment (a front batch's, or any that reach ``infer`` in one turn of
the event loop) leave in one ``InferBatch`` call instead of one ``Infer`` call each: a gRPC call
costs the private tier about as much CPU as a small model's back stage. A lone request still
goes as ``Infer``, so nothing waits for company.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import inference_pb2, inference_pb2_grpc
from public_api.settings import PublicSettings
from shared.batch_rpc import MAX_BATCH_BYTES, error_of, runs
from shared.errors import InternalError, SplitVaultError, Unavailable, error_from_grpc
from shared.layout import TierDir
from shared.logs import get_logger

log = get_logger(__name__)
CLIENT_CLOSED = "the private tier's client is closed"
_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@dataclass(frozen=True)
class BackStatus:
    """A back stage as the private tier reports it: loaded or why not (for operators), and
    its pairing id ('' when not loaded or packed without one)."""

    ready: bool
    reason: str
    pairing_id: str


def channel_target(addresses: list[str]) -> str:
    """A gRPC target for one address, or a round-robin list of IP addresses."""
    if len(addresses) == 1:
        return addresses[0]
    hosts = [address.rpartition(":")[0].strip("[]") for address in addresses]
    try:
        versions = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ValueError(
            "several private addresses must be IP literals; use one DNS name"
        ) from None
    scheme = "ipv4" if versions == {4} else "ipv6"
    return f"{scheme}:{','.join(addresses)}"


@dataclass
class _Pending:
    """Requests waiting for the next turn of the event loop, and their callers' futures."""

    requests: list[inference_pb2.InferRequest] = field(default_factory=list)
    futures: list[asyncio.Future[inference_pb2.InferResponse]] = field(default_factory=list)


class PrivateTierClient:
    """Calls ``splitvault.v1.PrivateInference`` over mutual TLS with the public identity."""

    def __init__(self, settings: PublicSettings, max_message_bytes: int | None = None) -> None:
        """``max_message_bytes``: the largest request it may send (default: the setting)."""
        tier = TierDir(settings.tier_dir)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tier.ca_cert.read_bytes(),
            private_key=(settings.client_tls / "client.key").read_bytes(),
            certificate_chain=(settings.client_tls / "client.crt").read_bytes(),
        )
        limit = max_message_bytes or settings.max_message_mb * 1024 * 1024
        self._channel = grpc.aio.secure_channel(
            channel_target(settings.private_addresses),
            credentials,
            options=[
                ("grpc.ssl_target_name_override", settings.private_server_name),
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.keepalive_time_ms", 30000),
            ],
        )
        self._stub = inference_pb2_grpc.PrivateInferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._ledger = inference_pb2_grpc.PrivateLedgerStub(self._channel)
        self._timeout = settings.request_timeout_s
        self._limit = limit
        self._pending: _Pending | None = None
        self._calls: set[asyncio.Task[None]] = set()  # in flight, kept from the collector

    async def infer(self, request: inference_pb2.InferRequest) -> inference_pb2.InferResponse:
        """Send one request, with any others sent in this turn of the event loop; map any
        failure to a ``SplitVaultError``."""
        loop = asyncio.get_running_loop()
        if self._pending is None:
            self._pending = _Pending()
            loop.call_soon(self._flush)
        future: asyncio.Future[inference_pb2.InferResponse] = loop.create_future()
        self._pending.requests.append(request)
        self._pending.futures.append(future)
        return await future

    def _flush(self) -> None:
        """Send what is pending: one ``Infer`` for a lone request, else ``InferBatch`` calls of
        at most ``MAX_REQUESTS`` requests within ``MAX_BATCH_BYTES``. A request whose caller
        stopped waiting before this turn is not sent."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        kept = [i for i, future in enumerate(pending.futures) if not future.done()]
        requests = [pending.requests[i] for i in kept]
        futures = [pending.futures[i] for i in kept]
        sizes = [request.ByteSize() for request in requests]
        for start, stop in runs(sizes, min(self._limit, MAX_BATCH_BYTES)):
            send = self._send_one if stop - start == 1 else self._send_batch
            task = asyncio.ensure_future(send(requests[start:stop], futures[start:stop]))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            for future in futures[start:stop]:
                future.add_done_callback(partial(_cancel_when_abandoned, task, futures[start:stop]))

    async def _send_one(
        self,
        requests: list[inference_pb2.InferRequest],
        futures: list[asyncio.Future[inference_pb2.InferResponse]],
    ) -> None:
        try:
            response: inference_pb2.InferResponse = await self._stub.Infer(
                requests[0], timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            _settle(futures[0], _mapped(error))
        except BaseException:  # the future must not wait forever
            _fail_all(futures)
            raise
        else:
            _settle(futures[0], response)

    async def _send_batch(
        self,
        requests: list[inference_pb2.InferRequest],
        futures: list[asyncio.Future[inference_pb2.InferResponse]],
    ) -> None:
        answered: set[int] = set()
        try:
            call = self._stub.InferBatch(
                inference_pb2.InferBatchRequest(requests=requests), timeout=self._timeout
            )
            async for reply in call:
                for result in reply.results:
                    if result.index >= len(futures) or result.index in answered:
                        continue  # not one of ours, or answered already: ignored
                    answered.add(result.index)
                    if result.HasField("response"):
                        _settle(futures[result.index], result.response)
                    else:
                        _settle(futures[result.index], error_of(result.error))
        except grpc.aio.AioRpcError as error:
            failure: SplitVaultError = _mapped(error)
        except BaseException:
            _fail_all(futures)
            raise
        else:
            if len(answered) == len(futures):
                return
            log.error("private_batch_unanswered", requests=len(futures), answered=len(answered))
            failure = InternalError("internal error")
        for future in futures:  # the call failed as a whole: so does each request left
            _settle(future, failure)

    async def anchor_audit(
        self, request: inference_pb2.AnchorRequest
    ) -> inference_pb2.AnchorReceipt:
        """Ask the private tier to anchor an audit chain's head; its signed receipt."""
        try:
            receipt: inference_pb2.AnchorReceipt = await self._ledger.AnchorAudit(
                request, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            mapped = _mapped(error)
            # For the operator's log only (never sent to a client): what the private tier said.
            mapped.message = f"{mapped.message} ({error.code().name}: {error.details()})"
            raise mapped from None
        return receipt

    async def model_status(self, model: str = "") -> dict[str, BackStatus]:
        """Model name -> its back stage's status as the private tier reports it."""
        try:
            reply = await self._stub.ModelStatus(
                inference_pb2.ModelStatusRequest(model=model), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise _mapped(error) from None
        return {
            status.name: BackStatus(status.ready, status.reason, status.pairing_id)
            for status in reply.models
        }

    async def serving(self, timeout_s: float = 1.0) -> bool:
        """Whether the private tier's health service reports SERVING."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        """Close the channel; a request not yet answered fails as ``Unavailable``."""
        pending, self._pending = self._pending, None
        for future in [] if pending is None else pending.futures:
            _settle(future, Unavailable(CLIENT_CLOSED))
        for task in list(self._calls):
            task.cancel()
        await self._channel.close(grace=None)


def _fail_all(futures: list[asyncio.Future[inference_pb2.InferResponse]]) -> None:
    """Settle a call's unanswered futures after an unexpected end (cancelled: the client is
    closing; anything else is logged, never shown to a customer)."""
    if sys.exc_info()[0] is not asyncio.CancelledError:
        log.exception("private_call_failed", requests=len(futures))
    for future in futures:
        _settle(future, Unavailable(CLIENT_CLOSED))


def _cancel_when_abandoned(
    task: asyncio.Task[None],
    futures: list[asyncio.Future[inference_pb2.InferResponse]],
    _: asyncio.Future[inference_pb2.InferResponse],
) -> None:
    """Cancel a call once nobody waits for any of its answers and a caller gave up (its
    future cancelled: a client that disconnected, a deadline of the ingress)."""
    if all(future.done() for future in futures) and any(f.cancelled() for f in futures):
        task.cancel()


def _settle(
    future: asyncio.Future[inference_pb2.InferResponse],
    outcome: inference_pb2.InferResponse | SplitVaultError,
) -> None:
    """Give a waiting caller its answer or error, unless it stopped waiting (cancelled)."""
    if future.done():
        return
    if isinstance(outcome, SplitVaultError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _mapped(error: grpc.aio.AioRpcError) -> SplitVaultError:
    """The call's status as an error, by the one table (``shared.errors.FROM_GRPC``)."""
    metadata: Any = error.trailing_metadata() or ()  # grpc.aio.Metadata: (key, value) pairs
    trailers = [(str(key), value) for key, value in metadata]
    return error_from_grpc(error.code(), error.details() or "", trailers)
