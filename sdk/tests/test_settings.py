"""Client settings: arguments checked, TLS files named, keys masked, plain HTTP warned about."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trustme

from splitvault_client import (
    AsyncClient,
    Client,
    InsecureTransportWarning,
    TLSError,
    create_signing_key,
)
from splitvault_client import _settings as settings_module
from splitvault_client._outcomes import RetryPolicy

SECRET = "sv_k0123abcd_s3cr3t-t0ken-do-not-print"


def make(url: str = "http://localhost", **kwargs: Any) -> settings_module.Settings:
    args: dict[str, Any] = {"api_key": None, "ca": None, "cert": None, "timeout": 5.0}
    return settings_module.make_settings(url, retry=RetryPolicy(), **(args | kwargs))


def test_settings_carry_bearer_and_refuse_bad_arguments() -> None:
    settings = make("https://h", api_key="k1")
    assert settings.headers["Authorization"] == "Bearer k1"
    assert settings.verify.verify_mode.name == "CERT_REQUIRED"
    assert "Authorization" not in make().headers
    for kwargs in ({"url": "ftp://h"}, {"timeout": 0}, {"api_key": " "}):
        with pytest.raises(ValueError):
            make(**kwargs)
    with pytest.raises(ValueError):
        settings_module.make_settings(
            "http://localhost", api_key=None, ca=None, cert=None, timeout=1,
            retry=RetryPolicy(retries=-1),
        )  # fmt: skip


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8000",
        "http://127.0.0.1",
        "http://127.8.0.1",
        "http://[::1]:9",
        "https://x",
    ],
)
def test_https_and_loopback_urls_draw_no_warning(url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(url, api_key=SECRET)


def test_plain_http_to_another_host_warns_at_the_callers_line() -> None:
    with pytest.warns(InsecureTransportWarning, match="API key, inputs and answers") as caught:
        Client("http://models.example:8080", api_key=SECRET).close()
    assert caught[0].filename == __file__  # stacklevel: the line that made the client
    assert "http://models.example" in str(caught[0].message)
    with pytest.warns(InsecureTransportWarning, match="inputs and answers") as caught:
        make("http://models-b.invalid")
    assert "API key" not in str(caught[0].message)


@pytest.mark.asyncio
async def test_the_async_client_warns_at_the_callers_line_too() -> None:
    with pytest.warns(InsecureTransportWarning) as caught:
        await AsyncClient("http://models-c.invalid", api_key=SECRET).close()
    assert caught[0].filename == __file__


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        make("https://h", ca="nope.crt")
    assert caught.value.filename == "nope.crt" and "nope.crt" in str(caught.value)
    assert "CA certificate (ca=)" in str(caught.value)
    authority = trustme.CA()
    ca = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca))
    with pytest.raises(FileNotFoundError) as caught:
        make("https://h", ca=ca, cert=(tmp_path / "client.pem", tmp_path / "client.key"))
    assert caught.value.filename == str(tmp_path / "client.pem")


def test_unreadable_tls_files_are_tls_errors_naming_them(tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSError, match=r"junk\.crt"):
        make("https://h", ca=junk)
    authority = trustme.CA()
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    authority.cert_pem.write_to_path(str(ca))
    authority.issue_cert("a.example").cert_chain_pems[0].write_to_path(str(cert))
    authority.issue_cert("b.example").private_key_pem.write_to_path(str(key))  # not its key
    with pytest.raises(TLSError, match=r"client\.pem"):
        make("https://h", ca=ca, cert=(cert, key))


def test_keys_are_masked_in_every_repr(tmp_path: Path) -> None:
    signing = tmp_path / "signing-key.json"
    create_signing_key(signing, key_id="k0123abcd", deployment="d1")
    pem_line = signing.read_text().split("\\n")[1]  # a line of the private key's base64
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    client = Client("https://h", api_key=SECRET, signing_key=signing, transport=transport)
    with client:
        call = client._infer_call("m", {"x": np.zeros((1, 2), np.float32)}, 1, None)
        texts = [
            repr(client),
            str(client),
            repr(client._settings),
            repr(client._settings.headers),
            repr(client._http.headers),
            repr(client._signer),
            repr(call),
        ]
    assert repr(client) == "Client('https://h', api_key=[secure], signing_key=[secure])"
    for text in texts:
        assert "s3cr3t" not in text and pem_line not in text, text
    assert client._settings.headers["Authorization"] == f"Bearer {SECRET}"  # still sent
