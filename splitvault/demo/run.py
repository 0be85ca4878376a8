"""``splitvault demo``: init, pack two real models, serve both tiers, compare with the unsplit model."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import RoundingPolicy, TopKPolicy, WatermarkConfig
from splitvault.commands import print_result
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import TierProcess, start_private, start_public
from splitvault.packing.pack import pack_spec
from splitvault.packing.spec import ModelSpec

_THREADS = {"SPLITVAULT_PRIVATE_TORCH_THREADS": "1", "SPLITVAULT_PUBLIC_TORCH_THREADS": "1"}


def run_demo(workdir: Path | None, *, include_minilm: bool = True) -> int:
    """Run the whole demo; returns 0 when every two-tier answer matches the unsplit model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _deploy_root(workdir) as root:
        print(f"== 1. splitvault init {root}")
        layout = init_deployment(root)
        provider = LocalFileKeyProvider.load(layout.kek)
        print("== 2. splitvault pack: a digits CNN trained now, and all-MiniLM-L6-v2")
        data = digits.load_data()
        digits_spec = _train_digits(data)
        # Watermark off: the demo compares every answer with the unsplit model (issue 14).
        print_result(pack_spec(digits_spec, name="digits", split=digits.SPLIT, layout=layout,
                               provider=provider, policy=TopKPolicy(k=3),
                               watermark=WatermarkConfig(enabled=False)))  # fmt: skip
        minilm_spec = _pack_minilm(layout, provider) if include_minilm else None
        api_key = _create_key(layout)
        print("== 3. splitvault serve private / serve public (mutual TLS between them)")
        with _running_tiers(layout) as url:
            print(f"   public endpoint {url} (Open Inference Protocol v2)")
            _accept_terms(url, layout, api_key)
            print("== 4. answers of the two-tier system next to the unsplit model (watermark off)")
            ok = _compare_digits(url, layout, api_key, digits_spec, data)
            if minilm_spec is not None:
                ok = _compare_minilm(url, layout, api_key, minilm_spec) and ok
    print("demo finished:", "all answers match" if ok else "MISMATCH (see above)")
    return 0 if ok else 1


@contextlib.contextmanager
def _deploy_root(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        yield workdir
        return
    temp = Path(tempfile.mkdtemp(prefix="splitvault-demo-"))
    try:
        yield temp / "deploy"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _train_digits(data: digits.DigitsData) -> ModelSpec:
    model = digits.train(data)
    print(f"   digits CNN trained: test accuracy {digits.accuracy(model, data):.3f}")
    return digits.spec_for(model, data)


def _pack_minilm(layout: DeployLayout, provider: LocalFileKeyProvider) -> ModelSpec | None:
    try:
        from splitvault.demo import minilm
    except ImportError:  # pragma: no cover - the demo extra is not installed
        print("   (transformers missing: install the 'demo' extra to pack MiniLM)")
        return None
    spec = minilm.factory()
    print_result(pack_spec(spec, name="minilm", split=minilm.SPLIT, layout=layout,
                           provider=provider, policy=RoundingPolicy(decimals=5)))  # fmt: skip
    return spec


@contextlib.contextmanager
def _running_tiers(layout: DeployLayout) -> Iterator[str]:
    private: TierProcess | None = None
    public: TierProcess | None = None
    try:
        private = start_private(layout.root, env=_THREADS)
        public = start_public(layout.root, private.port, env=_THREADS)
        yield f"https://localhost:{public.port}"
    finally:
        for tier in (public, private):
            if tier is not None:
                tier.stop()


def _create_key(layout: DeployLayout) -> str:
    from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore

    store = SqliteKeyStore(layout.public.root / STATE_DIR / KEYS_DB)
    try:
        key, secret = store.create("demo-client")
    finally:
        store.close()
    print(f"   splitvault keys create --name demo-client -> {key.key_id} (secret shown once)")
    return secret


def _client(url: str, layout: DeployLayout, api_key: str) -> Any:
    from splitvault_client import Client

    return Client(url, api_key=api_key, ca=layout.public.ca_cert)


def _accept_terms(url: str, layout: DeployLayout, api_key: str) -> None:
    with _client(url, layout, api_key) as client:
        terms = client.terms()
        client.accept_terms(terms.version)
    print(f"   the client read the terms of service (version {terms.version}) and accepted them")


def _compare_digits(
    url: str, layout: DeployLayout, api_key: str, spec: ModelSpec, data: Any
) -> bool:
    images, truth = data.test_x[:8], data.test_y[:8]
    with torch.inference_mode():
        probabilities = torch.softmax(spec.module(torch.from_numpy(images)).double(), dim=-1)
    with _client(url, layout, api_key) as client:
        prediction = client.predict("digits", images)
    print("\n   digits (policy: top-3, 4 decimals)")
    print(f"   {'true':>5} | {'unsplit top-1':>15} | {'two-tier top-3 (score:label)':<48}")
    agree = True
    for row, label in enumerate(truth):
        best = int(probabilities[row].argmax())
        answer = ", ".join(f"{s:.4f}:{lab}" for s, lab in
                           zip(prediction.scores[row], prediction.labels[row], strict=True))  # fmt: skip
        print(f"   {label:>5} | {best:>3} ({float(probabilities[row, best]):.4f}) | {answer}")
        agree = agree and best == int(prediction.indices[row, 0])
    expected = torch.topk(probabilities, 3, dim=-1).values.numpy()
    print(f"   max |score difference| vs unsplit: {np.abs(prediction.scores - expected).max():.2e}")
    return agree


def _compare_minilm(url: str, layout: DeployLayout, api_key: str, spec: ModelSpec) -> bool:
    from splitvault.demo import minilm

    inputs = minilm.tokenize(minilm.SENTENCES)
    with torch.inference_mode():
        expected = spec.module(**inputs).numpy()
    with _client(url, layout, api_key) as client:  # text in: the public tier tokenizes
        embedded = client.embed(minilm.SENTENCES, model="minilm")
    got = embedded.vectors
    print("\n   all-MiniLM-L6-v2 sentence embeddings of text (policy: rounded to 5 decimals)")
    print(
        f"   client.embed(sentences): {embedded.prompt_tokens} tokens, no tokenizer on the client"
    )
    similarity, reference = got @ got.T, expected @ expected.T
    for i, sentence in enumerate(minilm.SENTENCES):
        cells = " ".join(
            f"{similarity[i, j]:+.3f}({reference[i, j]:+.3f})" for j in range(len(got))
        )
        print(f"   {sentence[:40]:<40} {cells}")
    difference = float(np.abs(got - expected).max())
    print(
        f"   cosine similarities: two-tier (unsplit); max |embedding difference| {difference:.2e}"
    )
    return difference < 1e-3
