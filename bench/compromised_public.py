"""An attacker who owns the public host calls the private tier directly (issue 13, item 2).

It holds ``public/`` (the plaintext front, the client certificate) and sends activations of its
choosing to ``Infer`` over mutual TLS, under an API key id of its own per stream:

* (a) natural: the front's activations of held-out digits and augmented copies (shifts,
  rotations, light noise, contrast), as Knockoff would;
* (b) crafted: uniform noise, Gaussian around the reference mean (per-dimension, clipped at 0
  like a ReLU, and with the reference's full covariance), perturbation sweeps (64 steps of
  0.02 reference nearest-neighbour distances along random directions from natural rows), and
  natural streams with 10% uniform-noise or full-covariance rows mixed in.

For each stream it reports the answers obtained before the first refusal, the samples until
the first ``private_monitor_alert``, and the fidelity on held-out digits (top-1 agreement with
the model) of a copy of the back trained on those answers (however few), and for the full-covariance
family how that fidelity grows with the number of answers N. Baselines: the same tier with the
monitor off, where 20,000 uniform-noise queries are all answered. Benign checks: held-out
digits and 10,000 augmented ones, never alerted. Last, the monitor's CPU cost: natural rows,
one per request, 32 concurrent, to the tier with the monitor on and to one with it off.

Run from the repository root:  .venv/bin/python bench/compromised_public.py   (35 minutes on a busy 2-core host)
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import re
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import torch
from torch import nn

from bench.attacks import augment
from protos import inference_pb2, inference_pb2_grpc
from shared.keys import LocalFileKeyProvider
from shared.layout import FRONT_FILE, PRIVATE_IDENTITY, DeployLayout
from shared.manifest import TopKPolicy, read_manifest
from shared.tensor_codec import from_proto, to_proto
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import TierProcess, start_private
from splitvault.packing.pack import pack_spec

MODEL, BATCH, CAP = "digits", 16, 5000
CURVE = (8, 16, 32, 64, 96, 256, 1000)
TODAY = "40,000 answers in 10.9 s, none refused; copy 99.6% (issue 13)"


@dataclass
class Outcome:
    """What one stream got."""

    name: str
    sent: int
    answered: int
    first_alert: int | None
    fidelity: float | None


class Attacker:
    """The private tier through the public tier's certificate, and the front from ``public/``."""

    def __init__(self, layout: DeployLayout, port: int) -> None:
        tls = layout.public.tls
        credentials = grpc.ssl_channel_credentials(
            root_certificates=layout.public.ca_cert.read_bytes(),
            private_key=(tls / "client.key").read_bytes(),
            certificate_chain=(tls / "client.crt").read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", PRIVATE_IDENTITY)]
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)
        self.stub = inference_pb2_grpc.PrivateInferenceStub(self.channel)
        self.front = torch.export.load(str(layout.public.model(MODEL) / FRONT_FILE)).module()
        (self.spec,) = read_manifest(layout.private.model(MODEL)).inputs
        # The pairing id is in the public manifest: the attacker holds the public folder.
        self.pairing_id = read_manifest(layout.public.model(MODEL)).pairing_id or ""

    def activations(self, images: np.ndarray) -> np.ndarray:
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images), 1024):
                (out,) = self.front(torch.from_numpy(images[start : start + 1024]))
                parts.append(out.numpy())
        return np.concatenate(parts).astype(np.float16)

    def ask(self, rows: np.ndarray, key: str) -> np.ndarray | None:
        """Soft targets (top-3 scores, renormalised) for ``rows``; None when refused."""
        request = inference_pb2.InferRequest(
            model=MODEL,
            inputs=[to_proto(self.spec.name, rows)],
            key_id=key,
            top_k=3,
            pairing_id=self.pairing_id,
        )
        while True:
            try:
                reply = self.stub.Infer(request, timeout=60)
                break
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                    return None
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                time.sleep(0.5)  # the identity's rate (admission): pace, as a thief would
        outputs = {t.name: from_proto(t) for t in reply.outputs}
        return soft_targets(outputs, len(rows))

    def stream(self, rows: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Send until the first refusal; the rows answered and their targets."""
        kept, targets = [], []
        for start in range(0, len(rows), BATCH):
            part = rows[start : start + BATCH]
            answer = self.ask(part, key)
            if answer is None:
                break
            kept.append(part)
            targets.append(answer)
        if not kept:
            return rows[:0], np.zeros((0, 10), np.float32)
        return np.concatenate(kept), np.concatenate(targets)


def soft_targets(outputs: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """Top-k indices and scores, whatever the output names, as a probability row each."""
    ints = [a for a in outputs.values() if a.dtype.kind in "iu"]
    floats = [a for a in outputs.values() if a.dtype.kind == "f"]
    target = np.zeros((rows, 10), np.float32)
    if ints and floats:
        np.put_along_axis(target, ints[0].reshape(rows, -1), floats[0].reshape(rows, -1), 1)
        target /= np.maximum(target.sum(axis=1, keepdims=True), 1e-9)
    return target


def back_copy(x: np.ndarray, y: np.ndarray, seed: int = 0) -> nn.Module:
    """The attacker's copy of the back stage (its architecture guessed right)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(x.shape[1], 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    data, target = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    epochs = max(30, -(-600 // max(1, -(-len(data) // 64))))
    for _ in range(epochs):
        for batch in torch.randperm(len(data)).split(64):  # type: ignore[no-untyped-call]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(data[batch]), target[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return model.eval()


def fidelity(copy: nn.Module, held_out: np.ndarray, oracle: np.ndarray) -> float:
    with torch.inference_mode():
        predicted = copy(torch.from_numpy(held_out.astype(np.float32))).argmax(dim=1).numpy()
    return float((predicted == oracle).mean())


def augmented(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Benign augmented digits: shifts, rotations, light noise (``bench.attacks``), contrast."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = images[rng.integers(len(images))]
        if rng.random() < 0.25:
            image = np.clip(image * rng.uniform(0.6, 1.4), 0, 1).astype(np.float32)
        else:
            image = augment(image, rng)
        out.append(image)
    return np.stack(out)


def crafted_families(
    natural: np.ndarray, reference: np.ndarray, scale: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    shape, n = natural.shape[1:], CAP
    flat = reference.reshape(len(reference), -1).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)

    def shaped(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), *shape).astype(np.float16)

    lines = []
    for _ in range(n // 64 + 1):
        base = natural[rng.integers(len(natural))].reshape(-1).astype(np.float64)
        direction = rng.standard_normal(base.shape)
        direction *= 0.02 * scale / np.linalg.norm(direction)
        lines.append(base + np.arange(64)[:, None] * direction)
    mixed = natural[rng.integers(len(natural), size=n)].copy()
    crafted = rng.random(n) < 0.1
    mixed[crafted] = shaped(rng.uniform(0, flat.max(), (int(crafted.sum()), flat.shape[1])))
    cov = np.cov(flat.T)
    full_cov = shaped(np.maximum(rng.multivariate_normal(mean, cov, n, method="eigh"), 0))
    mixed_cov = natural[rng.integers(len(natural), size=n)].copy()
    mixed_cov[crafted] = full_cov[: int(crafted.sum())]
    return {
        "uniform noise": shaped(rng.uniform(0, flat.max(), (n, flat.shape[1]))),
        "Gaussian (mean, std)": shaped(rng.normal(mean, std, (n, flat.shape[1]))),
        "Gaussian, clipped at 0": shaped(np.maximum(rng.normal(mean, std, (n, flat.shape[1])), 0)),
        "Gaussian, full cov., clipped": full_cov,
        "perturbation sweeps": shaped(np.concatenate(lines)[:n]),
        "mixed: 10% uniform rows": mixed,
        "mixed: 10% full-cov. rows": mixed_cov,
    }


def first_alert(tier: TierProcess, key: str) -> int | None:
    time.sleep(0.3)  # the log reader thread catches up
    for event in tier.events():
        if event.get("event") == "private_monitor_alert" and event.get("key_id_asserted") == key:
            return int(event["samples"])
    return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def cpu_per_request(attacker: Attacker, tier: TierProcess, rows: np.ndarray, n: int) -> float:
    """Process CPU per request (ms), one natural row per request, 32 at once."""

    def one(i: int) -> None:
        attacker.ask(rows[i % len(rows)][None], f"cpu-{i % 50}")

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(200)))  # warm-up
        before = cpu_seconds(tier.process.pid)
        list(pool.map(one, range(n)))
        return (cpu_seconds(tier.process.pid) - before) * 1000 / n


def monitor_ms(tier: TierProcess) -> float:
    text = httpx.get(tier.metrics_url).text
    total = sum(
        float(v) for v in re.findall(r"splitvault_private_monitor_seconds_sum\S* (\S+)", text)
    )
    count = sum(
        float(v) for v in re.findall(r"splitvault_private_monitor_seconds_count\S* (\S+)", text)
    )
    return 1000 * total / max(count, 1.0)


def run(
    workdir: Path, stack: ExitStack, cpu_requests: int, skip_cpu: bool = False, copies: str = "all"
) -> None:
    data = digits.load_data()
    net = digits.train(data)
    layout = init_deployment(workdir / "deploy")
    provider = LocalFileKeyProvider.load(layout.kek)
    pack_spec(
        digits.spec_for(net, data),
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=provider,
        policy=TopKPolicy(k=3),
        show_progress=False,
    )
    base = {"SPLITVAULT_PRIVATE_TORCH_THREADS": "1", "SPLITVAULT_PRIVATE_METRICS_PORT": "0"}
    on = start_private(layout.root, env=base)
    stack.callback(on.stop)
    off_env = {**base, "SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__ENABLED": "false"}
    off_env["SPLITVAULT_PRIVATE_STATE_DIR"] = str(layout.private.root / "state-off")  # one each
    off = start_private(layout.root, env=off_env)
    stack.callback(off.stop)
    attacker, baseline = Attacker(layout, on.port), Attacker(layout, off.port)
    with torch.inference_mode():
        oracle = net(torch.from_numpy(data.test_x)).argmax(dim=1).numpy()
    held_out = attacker.activations(data.test_x)
    reference = attacker.activations(data.train_x)
    rng = np.random.default_rng(0)
    outcomes: list[Outcome] = []

    def measure(name: str, rows: np.ndarray, key: str, who: Attacker = attacker) -> None:
        x, y = who.stream(rows, key)
        copy = len(x) and (copies == "all" or name.startswith("(b)"))
        fid = fidelity(back_copy(x, y), held_out, oracle) if copy else None
        alert = first_alert(on, key) if who is attacker else None
        outcomes.append(Outcome(name, len(rows), len(x), alert, fid))
        print(f"  {name}: {len(x)} of {len(rows)} answered", flush=True)

    measure("clean held-out digits (3x)", np.concatenate([held_out] * 3), "benign-clean")
    benign = attacker.activations(augmented(data.test_x, 10_000, 1))
    measure("augmented held-out digits", benign, "benign-augmented")
    natural = np.concatenate([held_out, attacker.activations(augmented(data.test_x, 4_550, 2))])
    measure("(a) natural + augmented", natural, "natural")
    scale = float(np.median(_nearest(reference.reshape(len(reference), -1).astype(np.float32))))
    for i, (name, rows) in enumerate(crafted_families(held_out, reference, scale, rng).items()):
        measure(f"(b) {name}", rows, f"crafted-{i}")
    started = time.monotonic()
    noise = crafted_families(held_out, reference, scale, rng)["uniform noise"]
    measure("monitor off: uniform noise x4", np.concatenate([noise] * 4), "off", baseline)
    noise_s = time.monotonic() - started
    report(outcomes, noise_s)
    family = "Gaussian, full cov., clipped"
    full_cov = crafted_families(held_out, reference, scale, rng)[family]
    x, y = baseline.stream(full_cov[: max(CURVE)], "curve")  # the tier without the monitor
    print(f"\ncopy fidelity against answers N, {family} (monitor off; seed 0, 1, 2):")
    for n in CURVE:
        scores = [fidelity(back_copy(x[:n], y[:n], seed), held_out, oracle) for seed in range(3)]
        print(f"  N = {n:5d}: " + ", ".join(f"{100 * f:.1f}%" for f in scores), flush=True)
    if skip_cpu:
        return
    rows = held_out
    on_ms, off_ms = (
        cpu_per_request(attacker, on, rows, cpu_requests),
        cpu_per_request(baseline, off, rows, cpu_requests),
    )
    print(f"\nCPU per request, digits, one row each, c=32, {cpu_requests} requests:")
    print(
        f"  private tier, monitor on:  {on_ms:.3f} ms   off: {off_ms:.3f} ms   "
        f"(+{100 * (on_ms - off_ms) / off_ms:.1f}%)"
    )
    print(f"  the monitor itself (its metric): {monitor_ms(on):.3f} ms per request")


def _nearest(rows: np.ndarray) -> np.ndarray:
    norms = np.einsum("ij,ij->i", rows, rows)
    squared = norms[:, None] + norms[None, :] - 2 * rows @ rows.T
    np.fill_diagonal(squared, np.inf)
    return np.asarray(np.sqrt(np.maximum(squared.min(axis=1), 0)))


def report(outcomes: Sequence[Outcome], noise_s: float) -> None:
    print(f"\ntoday (issue 13): {TODAY}")
    print(f"{'stream':34} {'sent':>6} {'answered':>9} {'first alert':>12} {'copy fidelity':>14}")
    for o in outcomes:
        alert = "-" if o.first_alert is None else str(o.first_alert)
        fid = "-" if o.fidelity is None else f"{100 * o.fidelity:.1f}%"
        print(f"{o.name:34} {o.sent:>6} {o.answered:>9} {alert:>12} {fid:>14}")
    print(
        f"(monitor off: {outcomes[-1].answered} noise answers in {noise_s:.1f} s incl. copy training)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-requests", type=int, default=3000)
    parser.add_argument("--skip-cpu", action="store_true", help="(bench/private_checks_cpu.py)")
    parser.add_argument(
        "--copies",
        choices=["all", "crafted"],
        default="all",
        help="train copies for every stream, or only the crafted ones (quicker)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        run(Path(tmp), stack, args.cpu_requests, args.skip_cpu, args.copies)


if __name__ == "__main__":
    main()
