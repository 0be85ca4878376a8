"""The SDK against a real public tier (real processes, real mTLS between tiers, real HTTPS):
float64 inputs, more rows than the model takes, the key's limits, a CA that is not the
server's (issue 18 item 9).

One deployment whose digits model takes at most ``MAX_BATCH`` rows a request. Each test has
API keys of its own; ``signer`` also signs its requests with a key the operator registered, so
a chunk whose signature did not verify would be refused by the private tier.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from splitvault_client import Client, RateLimited, TLSError, Unavailable

from public_api.keys import parse_key_id
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.packing.pack import pack_spec
from splitvault.pki import create_ca, write_ca_cert_only
from tests.conftest import DigitsFixture, issue_key
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import REPO_ROOT, https, image_request, tier_env

pytestmark = pytest.mark.slow

MODEL = "digits"
MAX_BATCH = 16


@dataclass
class Stack:
    layout: DeployLayout
    images: npt.NDArray[np.float32]
    signer_key: str
    signing_key: Path
    private: TierProcess
    public: TierProcess

    @property
    def url(self) -> str:
        return f"https://localhost:{self.public.port}"

    def client(self, key: str, **kwargs: Any) -> Client:
        return Client(self.url, api_key=key, ca=self.layout.public.ca_cert, **kwargs)


class Recording(httpx.HTTPTransport):
    """The real HTTPS transport, noting each inference request's rows and answer status."""

    def __init__(self, ca: Path) -> None:
        super().__init__(verify=ssl.create_default_context(cafile=str(ca)))
        self.infers: list[tuple[int, int]] = []  # (rows, status)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/infer"):
            rows = httpx.Response(200, content=request.content).json()["inputs"][0]["shape"][0]
            self.infers.append((rows, response.status_code))
        return response


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "splitvault", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return done.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("sdk")
    layout = init_deployment(root / "d")
    pack_spec(
        digits_model.spec, name=MODEL, split=digits.SPLIT, layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek), policy=TopKPolicy(k=3),
        max_batch_size=MAX_BATCH, show_progress=False,
    )  # fmt: skip
    signer_key = issue_key(layout, "signer")
    signer_id = parse_key_id(signer_key)
    assert signer_id is not None
    deployment = _cli("keys", "signers", "--deploy", str(layout.root)).split()[-1]
    key_file = root / "customer" / "signing-key.json"
    key_file.parent.mkdir()
    created = _cli(
        "keys", "signer-create", "--key-id", signer_id, "--deployment", deployment,
        "--out", str(key_file),
    )  # fmt: skip
    public_key = created.split("--public-key ")[1].strip()
    _cli("keys", "signer-register", "--deploy", str(layout.root), "--key-id", signer_id,
         "--public-key", public_key)  # fmt: skip
    private = start_private(layout.root, env=tier_env())
    try:
        public = start_public(layout.root, private.port, env=tier_env())
    except BaseException:
        private.stop()
        raise
    try:
        images = digits_model.data.test_x[:40]
        yield Stack(layout, images, signer_key, key_file, private, public)
    finally:
        public.stop()
        private.stop()


def test_float64_inputs_are_cast_to_the_declared_fp32(stack: Stack) -> None:
    key = issue_key(stack.layout, "float64")
    as_float64 = stack.images[:5].astype(np.float64)  # what NumPy and scikit-learn make
    body = image_request(stack.images[:5])
    body["inputs"][0]["datatype"] = "FP64"
    with https(stack.layout, stack.public.port, key) as raw:
        refused = raw.post(f"/v2/models/{MODEL}/infer", json=body)
    assert refused.status_code == 400  # the server takes FP32 only: the SDK must convert
    assert "must have datatype FP32" in refused.json()["error"]
    with stack.client(key) as client:
        cast = client.predict(MODEL, as_float64, top_k=3)
        exact = client.predict(MODEL, stack.images[:5], top_k=3)
    assert cast.indices is not None and exact.indices is not None
    np.testing.assert_array_equal(cast.indices, exact.indices)
    np.testing.assert_array_equal(cast.scores, exact.scores)


def test_more_rows_than_the_model_takes_are_answered_in_signed_chunks(stack: Stack) -> None:
    transport = Recording(stack.layout.public.ca_cert)
    signing = {"signing_key": stack.signing_key, "transport": transport}
    with stack.client(stack.signer_key, **signing) as client:
        with pytest.raises(ValueError, match="pass chunk=True to send them as 3 requests"):
            client.predict(MODEL, stack.images)
        assert transport.infers == []  # refused before sending
        chunked = client.predict(MODEL, stack.images.astype(np.float64), top_k=3, chunk=True)
        parts = [client.predict(MODEL, stack.images[i : i + 16], top_k=3) for i in (0, 16, 32)]
    # Each chunk is a request of its own, signed on its own (a bad signature is refused).
    assert transport.infers[:3] == [(16, 200), (16, 200), (8, 200)]
    assert chunked.indices is not None and chunked.indices.shape == (40, 3)
    expected = np.concatenate([part.indices for part in parts if part.indices is not None])
    np.testing.assert_array_equal(chunked.indices, expected)


def test_chunks_shrink_to_the_keys_burst(stack: Stack) -> None:
    key = issue_key(stack.layout, "burst-10", burst=10, rate_per_s=1000.0)
    transport = Recording(stack.layout.public.ca_cert)
    with stack.client(key, transport=transport) as client:
        prediction = client.predict(MODEL, stack.images, chunk=True)
    # 16 rows can never pass a burst of 10: refused before anything runs, then chunks of 10.
    assert transport.infers[0] == (16, 429)
    answered = [rows for rows, status in transport.infers if status == 200]
    assert answered == [10, 10, 10, 10]
    assert prediction.indices is not None and prediction.indices.shape[0] == 40


def test_chunks_wait_out_the_rate_limit(stack: Stack) -> None:
    # A burst of 16 refilled at 3 rows/s: the second chunk comes long before it is refilled.
    key = issue_key(stack.layout, "paced", burst=16, rate_per_s=3.0)
    transport = Recording(stack.layout.public.ca_cert)
    with stack.client(key, transport=transport) as client:
        prediction = client.predict(MODEL, stack.images[:32], chunk=True)
    assert transport.infers[0] == (16, 200) and transport.infers[1] == (16, 429)
    assert transport.infers[-1] == (16, 200)
    assert sum(rows for rows, status in transport.infers if status == 200) == 32
    assert prediction.indices is not None and prediction.indices.shape[0] == 32


def test_a_daily_quota_stops_the_chunks_saying_how_far_they_got(stack: Stack) -> None:
    key = issue_key(stack.layout, "quota-20", daily_quota=20)
    with stack.client(key) as client, pytest.raises(RateLimited) as caught:
        client.predict(MODEL, stack.images, chunk=True)
    assert "daily quota" in caught.value.message
    assert caught.value.__notes__ == ["16 of 40 rows had been answered"]


def test_a_ca_that_did_not_issue_the_servers_certificate_is_a_tls_error(
    stack: Stack, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.crt"
    write_ca_cert_only(create_ca(), other)
    client = Client(stack.url, api_key=stack.signer_key, ca=other, retries=3)
    with client, pytest.raises(TLSError) as caught:
        client.live()
    assert not isinstance(caught.value, Unavailable)  # not "retry later": fix the ca=
    assert "pass ca=" in caught.value.message and "certificate" in caught.value.message
