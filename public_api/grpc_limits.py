"""The v2 gRPC ingress's own limits, enforced where its refusals are audited.

gRPC refuses a message over ``grpc.max_receive_message_length`` and a call over
``maximum_concurrent_rpcs`` before any handler runs, so nothing of those refusals reached the
audit trail. The ingress sets those two library limits to a hard cap above its own
(``HARD_CAP_FACTOR``) and enforces its own in the servicer: a message over ``max_body_bytes``
and a call beyond ``max_connections`` in flight are refused there (RESOURCE_EXHAUSTED, with a
clear message) and audited like every other outcome. Only what exceeds the hard cap is still
refused by gRPC unaudited: the cap bounds the memory a call may take before it is seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError
from prometheus_client import Gauge

from shared.errors import InvalidInput, MessageTooLarge, Overloaded, SplitVaultError

HARD_CAP_FACTOR = 2  # gRPC's own limits, as multiples of the ingress's
M = TypeVar("M")


@dataclass(frozen=True)
class Refused:
    """A request message the servicer must refuse (audited) instead of reading."""

    error: SplitVaultError


@dataclass(frozen=True)
class MessageGate(Generic[M]):
    """A request deserializer that refuses, rather than parses, a message over ``max_bytes``
    or one that is not a valid ``parse`` message (gRPC would answer INTERNAL, unaudited)."""

    parse: Callable[[bytes], M]
    max_bytes: int

    def __call__(self, data: bytes) -> M | Refused:
        if len(data) > self.max_bytes:
            return Refused(
                MessageTooLarge(
                    f"request message of {len(data)} bytes exceeds the limit of "
                    f"{self.max_bytes} bytes"
                )
            )
        try:
            return self.parse(data)
        except DecodeError:
            return Refused(InvalidInput("request message is not a valid protobuf message"))


class InFlight:
    """Calls under way on the ingress, at most ``limit``, shown by ``gauge`` (the event loop's
    only: no lock)."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        self.count = 0
        self.gauge = gauge

    def enter(self) -> None:
        """Count one more call, or raise ``Overloaded`` (RESOURCE_EXHAUSTED) when full."""
        if self.count >= self.limit:
            raise Overloaded(
                f"too many calls in flight on the gRPC ingress (at most {self.limit}); retry later",
                retry_after_s=1.0,
            )
        self.count += 1
        self.gauge.set(self.count)

    def leave(self) -> None:
        self.count -= 1
        self.gauge.set(self.count)
