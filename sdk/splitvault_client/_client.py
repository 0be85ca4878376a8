"""``Client`` and ``AsyncClient``: thin I/O shells around ``_protocol``, one blocking, one async."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np

from . import _protocol as proto
from ._chunking import ChunkedPredict, chunk_size
from ._embeddings import Embeddings, embeddings_call, parse_embeddings
from ._exceptions import RateLimited
from ._inputs import Array, conform
from ._outcomes import Outcome, RetryPolicy, settle
from ._protocol import Call, Inputs
from ._settings import StrPath, make_settings
from ._signing import RequestSigner
from ._types import ModelMetadata, Prediction, Terms, TermsAcceptance

# Client.__init__ -> _Base.__init__ -> make_settings: warnings point at the caller's line.
_CALLER = 3


class _Base:
    """Argument handling and the per-model metadata cache, common to both clients."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        ca: StrPath | None = None,
        cert: tuple[StrPath, StrPath] | None = None,
        timeout: float = 30.0,
        retries: int = 0,
        backoff: float = 0.2,
        *,
        max_backoff: float = 30.0,
        signing_key: StrPath | None = None,
    ) -> None:
        retry = RetryPolicy(retries, backoff, max_backoff)
        self._settings = make_settings(
            url, api_key=api_key, ca=ca, cert=cert, timeout=timeout, retry=retry, stacklevel=_CALLER
        )
        self._metadata: dict[str, ModelMetadata] = {}
        self._signer = None if signing_key is None else RequestSigner.load(signing_key)

    def __repr__(self) -> str:
        key = ", api_key=[secure]" if "Authorization" in self._settings.headers else ""
        signed = ", signing_key=[secure]" if self._signer is not None else ""
        return f"{type(self).__name__}({self._settings.base_url!r}{key}{signed})"

    def _plan(
        self, metadata: ModelMetadata, inputs: Inputs, chunk: bool | int
    ) -> tuple[dict[str, Array], ChunkedPredict | None]:
        """The inputs in the model's datatypes, and the chunks to send them in (or none)."""
        arrays = conform(metadata, inputs)
        size = chunk_size(metadata, arrays, chunk)
        if size is None:
            return arrays, None
        return arrays, ChunkedPredict(arrays, size, max_wait=self._settings.retry.max_backoff)

    def _infer_call(
        self, model: str, inputs: Mapping[str, Any], top_k: int | None, rid: str | None
    ) -> Call:
        """The inference call, signed when the client holds a signing key."""
        call = proto.infer_call(model, inputs, top_k=top_k, request_id=rid)
        if self._signer is None or call.body is None:
            return call
        shapes = {name: tuple(np.shape(array)) for name, array in inputs.items()}
        sign = partial(self._signer.headers, model, call.body, shapes, top_k)
        return replace(call, signer=sign)

    def _remember(self, metadata: ModelMetadata, model: str) -> ModelMetadata:
        self._metadata[model] = metadata
        return metadata


class Client(_Base):
    """Blocking client for a splitvault server (Open Inference Protocol v2 over REST).

    ``url`` is the server's base URL (``http://`` to another machine draws an
    ``InsecureTransportWarning``). ``api_key`` is sent as a bearer token and masked in every
    repr. TLS is verified against ``ca`` (a PEM file) or certifi's bundle; ``cert`` is a
    ``(cert_file, key_file)`` pair presented for mutual TLS; a TLS failure raises ``TLSError``.
    ``timeout`` (seconds) bounds connecting and each read (``Timeout``). ``retries`` extra tries
    are made for GETs that failed and for other calls that got a 503 or could not connect,
    waiting ``backoff * 2**n`` seconds or the server's Retry-After, at most ``max_backoff``.
    ``transport`` replaces the network (tests pass an ``httpx.MockTransport``). ``signing_key``:
    a key file from ``create_signing_key``; every inference request is then signed with it
    (RFC 9421, Ed25519; the ``signing`` extra). Errors are ``SplitVaultClientError`` subclasses.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        ca: StrPath | None = None,
        cert: tuple[StrPath, StrPath] | None = None,
        timeout: float = 30.0,
        retries: int = 0,
        backoff: float = 0.2,
        *,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        signing_key: StrPath | None = None,
    ) -> None:
        super().__init__(
            url,
            api_key,
            ca,
            cert,
            timeout,
            retries,
            backoff,
            max_backoff=max_backoff,
            signing_key=signing_key,
        )
        s = self._settings
        self._http = httpx.Client(
            base_url=s.base_url,
            headers=s.headers,
            timeout=s.timeout,
            verify=s.verify,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def live(self) -> bool:
        """Whether the server process is up; raises ``Unavailable`` if it cannot be reached."""
        return proto.parse_health(self._send(proto.live_call()))

    def ready(self) -> bool:
        """Whether the server is ready to serve inference."""
        return proto.parse_health(self._send(proto.ready_call()))

    def model_ready(self, model: str) -> bool:
        """Whether ``model`` is loaded and ready; raises ``ModelNotFound`` if it is not deployed."""
        return proto.parse_health(self._send(proto.model_ready_call(model)))

    def model_metadata(self, model: str) -> ModelMetadata:
        """The model's inputs, outputs, task, policy and labels (fetched, then cached)."""
        metadata = proto.parse_metadata(self._send(proto.metadata_call(model)))
        return self._remember(metadata, model)

    def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        top_k: int | None = None,
        request_id: str | None = None,
        chunk: bool | int = False,
    ) -> Prediction:
        """Run ``model`` on a NumPy array (single-input models) or a dict of name -> array.

        Inputs are converted to the model's declared datatypes where nothing that matters is
        lost (float64 -> FP32), else refused here with the fix. ``top_k`` asks a classifier for
        its k best classes. ``chunk=True`` sends more rows than the model takes at once as
        several requests of at most its ``max_batch_size`` rows (``chunk=N``: at most N), one
        after another, and joins the answers; without it such a call raises ``ValueError``.
        """
        arrays, chunks = self._plan(self._cached_metadata(model), inputs, chunk)
        if chunks is None:
            call = self._infer_call(model, arrays, top_k, request_id)
            return proto.parse_prediction(self._send(call))
        while (part := chunks.pending()) is not None:
            call = self._infer_call(model, part, top_k, chunks.chunk_id(request_id))
            try:
                chunks.answered(self._send(call))
            except RateLimited as refused:
                time.sleep(chunks.refused(refused))
        return proto.prediction_from_json(chunks.merged(request_id))

    def embed(self, sentences: str | Sequence[str], *, model: str) -> Embeddings:
        """Embed sentences with a text model (``POST /v1/embeddings``); sentences longer than
        the model's maximum length are truncated, and ``Embeddings.truncated`` says which."""
        return parse_embeddings(self._send(embeddings_call(model, sentences)))

    def terms(self) -> Terms:
        """The server's current terms of use."""
        return proto.parse_terms(self._send(proto.terms_call()))

    def accept_terms(self, version: str) -> TermsAcceptance:
        """Accept ``version`` of the terms for this API key."""
        return proto.parse_acceptance(self._send(proto.accept_terms_call(version)))

    def _cached_metadata(self, model: str) -> ModelMetadata:
        return self._metadata.get(model) or self.model_metadata(model)

    def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            outcome = self._attempt(call)
            result = settle(call, outcome)
            if isinstance(result, httpx.Response):
                return result
            delay = self._settings.retry.delay(call, attempt, outcome)
            if delay is None:
                raise result
            time.sleep(delay)
            attempt += 1

    def _attempt(self, call: Call) -> Outcome:
        try:
            return self._http.request(
                call.method, call.path, content=call.body, headers=call.attempt_headers()
            )
        except httpx.RequestError as exc:
            return exc


class AsyncClient(_Base):
    """Asynchronous twin of ``Client``, with the same arguments; use ``async with``.

    ``transport`` takes an ``httpx.AsyncBaseTransport`` (tests pass an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        ca: StrPath | None = None,
        cert: tuple[StrPath, StrPath] | None = None,
        timeout: float = 30.0,
        retries: int = 0,
        backoff: float = 0.2,
        *,
        max_backoff: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        signing_key: StrPath | None = None,
    ) -> None:
        super().__init__(
            url,
            api_key,
            ca,
            cert,
            timeout,
            retries,
            backoff,
            max_backoff=max_backoff,
            signing_key=signing_key,
        )
        s = self._settings
        self._http = httpx.AsyncClient(
            base_url=s.base_url,
            headers=s.headers,
            timeout=s.timeout,
            verify=s.verify,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def live(self) -> bool:
        """Whether the server process is up; raises ``Unavailable`` if it cannot be reached."""
        return proto.parse_health(await self._send(proto.live_call()))

    async def ready(self) -> bool:
        """Whether the server is ready to serve inference."""
        return proto.parse_health(await self._send(proto.ready_call()))

    async def model_ready(self, model: str) -> bool:
        """Whether ``model`` is loaded and ready; raises ``ModelNotFound`` if it is not deployed."""
        return proto.parse_health(await self._send(proto.model_ready_call(model)))

    async def model_metadata(self, model: str) -> ModelMetadata:
        """The model's inputs, outputs, task, policy and labels (fetched, then cached)."""
        metadata = proto.parse_metadata(await self._send(proto.metadata_call(model)))
        return self._remember(metadata, model)

    async def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        top_k: int | None = None,
        request_id: str | None = None,
        chunk: bool | int = False,
    ) -> Prediction:
        """Run ``model`` on a NumPy array or a dict of name -> array (see ``Client.predict``)."""
        arrays, chunks = self._plan(await self._cached_metadata(model), inputs, chunk)
        if chunks is None:
            call = self._infer_call(model, arrays, top_k, request_id)
            return proto.parse_prediction(await self._send(call))
        while (part := chunks.pending()) is not None:
            call = self._infer_call(model, part, top_k, chunks.chunk_id(request_id))
            try:
                chunks.answered(await self._send(call))
            except RateLimited as refused:
                await asyncio.sleep(chunks.refused(refused))
        return proto.prediction_from_json(chunks.merged(request_id))

    async def embed(self, sentences: str | Sequence[str], *, model: str) -> Embeddings:
        """Embed sentences with a text model (``POST /v1/embeddings``); see ``Client.embed``."""
        return parse_embeddings(await self._send(embeddings_call(model, sentences)))

    async def terms(self) -> Terms:
        """The server's current terms of use."""
        return proto.parse_terms(await self._send(proto.terms_call()))

    async def accept_terms(self, version: str) -> TermsAcceptance:
        """Accept ``version`` of the terms for this API key."""
        return proto.parse_acceptance(await self._send(proto.accept_terms_call(version)))

    async def _cached_metadata(self, model: str) -> ModelMetadata:
        return self._metadata.get(model) or await self.model_metadata(model)

    async def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            outcome = await self._attempt(call)
            result = settle(call, outcome)
            if isinstance(result, httpx.Response):
                return result
            delay = self._settings.retry.delay(call, attempt, outcome)
            if delay is None:
                raise result
            await asyncio.sleep(delay)
            attempt += 1

    async def _attempt(self, call: Call) -> Outcome:
        try:
            return await self._http.request(
                call.method, call.path, content=call.body, headers=call.attempt_headers()
            )
        except httpx.RequestError as exc:
            return exc
