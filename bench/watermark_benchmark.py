"""Ownership watermarks against model extraction, through the public API of a two-tier deployment.

For each scheme (the label watermark under the label-only policy, the signal watermark under the
score-returning top-3 policy; default settings: 5% of the queries with top-1 probability below
0.9, amplitude 0.1) the digits model is packed into its own temporary deployment with that
watermark on, and both tiers are started (the extraction monitor set to ``record`` and the
attacker's key given high limits, so nothing blocks it: this measures the watermark, not the
monitor). A natural-data attacker (``bench/attacks.py``: held-out digits and augmented copies)
steals the model at each budget with a fresh API key, 64 images per request, and trains a copy
on the answers. For each copy: its fidelity (top-1 agreement with the model on the training
split, which nobody queried), and the verifier's p-value with the attacker's own queries as the
candidate set (the queries a court would order disclosed). The same candidate sets are used to
test independently trained models of the same and of other architectures, which must never be
claimed. A benign client's top-1 accuracy through the API, against the model's own on the same
queries, gives each scheme's accuracy cost. Columns: distinct canonical queries the attacker
sent; pool, those the scheme's test uses (label: the eligible ones); trials, the selected ones
(label) or all (signal); matches; fidelity; the copy's p-value and whether it is claimed at
2^-64; how many selected candidates the private tier's trigger log confirms; the smallest
p-value of the independent models and how many of them fall below 1e-3.

    .venv/bin/python bench/watermark_benchmark.py                    # about 15 minutes on 2 cores
    .venv/bin/python bench/watermark_benchmark.py --budgets 500 1000 --independent 4   # quicker
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "sdk"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from bench.attacks import Answer, Images, NaturalAttacker, Pacing, agreement, augment, train_copy
from shared.keys import LocalFileKeyProvider
from shared.logs import configure_logging
from shared.manifest import LabelPolicy, TopKPolicy, WatermarkConfig
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import start_both
from splitvault.ownership.owner import OwnerModel
from splitvault.ownership.stats import DEFAULT_ALPHA
from splitvault.ownership.verify import Verification, verify_candidates
from splitvault.packing.pack import pack_spec

MODEL = "digits"
BATCH = 64
CLAIM_FLOOR = 1e-3  # an independent model must never reach this
Scheme = Literal["label", "signal"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--budgets", type=int, nargs="+", default=[500, 1000, 5000, 20000])
    parser.add_argument("--independent", type=int, default=12, help="independent models")
    parser.add_argument("--benign", type=int, default=10000, help="benign queries per scheme")
    defaults = WatermarkConfig()
    parser.add_argument("--fraction", type=float, default=defaults.fraction)
    parser.add_argument("--max-confidence", type=float, default=defaults.max_confidence)
    parser.add_argument("--amplitude", type=float, default=defaults.amplitude)
    parser.add_argument("--schemes", nargs="+", default=["label", "signal"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class ModelSuspect:
    """An in-memory model as a suspect (the verifier reads its logits)."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.description, self.model = name, model

    def rank(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Every class, best first."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(inputs["image"])).numpy()
        return np.argsort(-logits, axis=1, kind="stable").astype(np.int64)


def _fit(model: nn.Module, data: digits.DigitsData, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):  # type: ignore[no-untyped-call]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return model.eval()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _wide_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def _linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


ARCHITECTURES: list[tuple[str, Callable[[], nn.Module]]] = [
    ("same CNN", digits.DigitsCNN),
    ("MLP", _mlp),
    ("wide CNN", _wide_cnn),
    ("linear", _linear),
]


def independent_models(count: int, seed: int) -> list[ModelSuspect]:
    """``count`` models trained on the true labels, each on its own split and seed."""
    models = []
    for i in range(count):
        name, make = ARCHITECTURES[i % len(ARCHITECTURES)]
        torch.manual_seed(seed + 1000 + i)
        data = digits.load_data(seed=seed + 100 + i)
        models.append(ModelSuspect(f"{name} #{i}", _fit(make(), data, 15, seed + i)))
    return models


@dataclass
class Deployed:
    """One scheme's running deployment and the owner's view of it."""

    scheme: Scheme
    url: str
    ca: Path
    keys: Any  # SqliteKeyStore
    owner: OwnerModel


def deploy(
    scheme: str, args: argparse.Namespace, net: nn.Module, workdir: Path, stack: ExitStack
) -> Deployed:
    """Pack the model with this scheme's watermark and start both tiers."""
    from public_api.keys import SqliteKeyStore

    data = digits.load_data()
    kind: Scheme = "label" if scheme == "label" else "signal"
    layout = init_deployment(workdir / scheme)
    watermark = WatermarkConfig(
        enabled=True,
        scheme=kind,
        fraction=args.fraction,
        max_confidence=args.max_confidence,
        amplitude=args.amplitude,
    )
    pack_spec(
        digits.spec_for(net, data),
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=LabelPolicy() if kind == "label" else TopKPolicy(k=3),
        show_progress=False,
        watermark=watermark,
    )
    env = {
        "SPLITVAULT_PRIVATE_TORCH_THREADS": "1",
        "SPLITVAULT_PUBLIC_TORCH_THREADS": "1",
        "SPLITVAULT_PUBLIC_PROTECTION__MONITOR_ACTION": "record",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__RATE_PER_S": "100000",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__BURST": "100000",
    }
    public, _ = start_both(layout.root, stack, env=env)
    keys = SqliteKeyStore(layout.public.root / "state" / "keys.sqlite3")
    stack.callback(keys.close)
    owner = OwnerModel(layout.root, MODEL)
    return Deployed(kind, f"https://localhost:{public.port}", layout.public.ca_cert, keys, owner)


def client(deployed: Deployed, name: str) -> Any:
    """An SDK client with a fresh key (high limits) that accepted the terms."""
    from splitvault_client import Client

    _, secret = deployed.keys.create(name, rate_per_s=1e6, burst=10**6, daily_quota=10**9)
    sdk = Client(deployed.url, api_key=secret, ca=deployed.ca, timeout=60)
    sdk.accept_terms(sdk.terms().version)
    return sdk


def ask(sdk: Any, images: Images) -> Answer:
    """One request; label-only answers carry no scores."""
    prediction = sdk.predict(MODEL, images)
    indices = prediction.indices
    scores = prediction.scores
    if scores is None or np.isnan(scores).all():
        return Answer(indices[:, 0])
    return Answer(indices[:, 0], indices, scores)


def benign_cost(
    deployed: Deployed, data: digits.DigitsData, count: int, seed: int
) -> tuple[float, float]:
    """Top-1 accuracy of the model itself and of the API's (watermarked) answers on the same
    ``count`` labelled queries: all digits, 80% of them augmented (mostly distinct queries)."""
    pool = np.concatenate([data.train_x, data.test_x])
    labels = np.concatenate([data.train_y, data.test_y])
    rng = np.random.default_rng(seed)
    picked = rng.integers(len(pool), size=count)
    images = np.stack([augment(pool[i], rng) if rng.random() < 0.8 else pool[i] for i in picked])
    truth = labels[picked]
    sdk = client(deployed, "benign")
    answered = np.concatenate(
        [ask(sdk, images[i : i + BATCH]).labels for i in range(0, count, BATCH)]
    )
    sdk.close()
    owner = deployed.owner
    own = owner.probabilities(owner.back_inputs({"image": images})).argmax(axis=1)
    return float((own == truth).mean()), float((answered == truth).mean())


@dataclass
class Row:
    """One (scheme, budget) line of the table."""

    scheme: str
    budget: int
    fidelity: float
    copy: Verification
    independent: list[Verification]
    seconds: float


def attack(
    deployed: Deployed,
    budget: int,
    seed: int,
    eval_labels: np.ndarray,
    independents: list[ModelSuspect],
    eval_x: Images,
    pool: Images,
) -> Row:
    """Steal at ``budget`` queries, train the copy, verify it and the independent models."""
    started = time.perf_counter()
    attacker = NaturalAttacker(pool, Pacing(budget, BATCH, 1.0, 0.0, seed))
    sdk = client(deployed, f"attacker-{budget}")
    while (batch := attacker.next_batch()) is not None:
        attacker.receive(batch, ask(sdk, batch.images))
    sdk.close()
    copy = train_copy(attacker.transcript, seed=seed)
    owner = deployed.owner
    queried = np.concatenate(attacker.transcript.images)
    candidates = owner.candidates({"image": queried}, owner.marker())
    verdict = verify_candidates(
        owner, candidates, ModelSuspect("copy", copy), schemes=deployed.scheme
    )
    others = [
        verify_candidates(
            owner, candidates, model, schemes=deployed.scheme, triggers=verdict.triggers
        )
        for model in independents
    ]
    fidelity = agreement(copy, eval_labels, eval_x)
    return Row(deployed.scheme, budget, fidelity, verdict, others, time.perf_counter() - started)


def print_table(rows: list[Row], costs: dict[str, tuple[float, float]], count: int) -> None:
    """The results, one line per scheme and budget."""
    print(
        f"{'scheme':<7} {'budget':>6} {'distinct':>8} {'pool':>6} {'trials':>6} {'matches':>7} "
        f"{'fidelity':>8} {'copy p':>9} {'claimed':>7} {'trigger log':>11} "
        f"{'indep. min p':>12} {'indep. claimed':>14}"
    )
    for row in rows:
        result = row.copy.results[0]
        indep = [v.results[0].p_value for v in row.independent]
        claimed = sum(p < CLAIM_FLOOR for p in indep)
        log = (
            f"{row.copy.triggers.found}/{row.copy.triggers.selected}"
            if row.scheme == "label"
            else "-"
        )
        print(
            f"{row.scheme:<7} {row.budget:>6,} {row.copy.candidates:>8,} {result.candidates:>6,} "
            f"{result.trials:>6,} "
            f"{result.matches:>7,} {row.fidelity:>8.1%} {result.p_value:>9.2g} "
            f"{'yes' if row.copy.claimed else 'no':>7} {log:>11} {min(indep):>12.2g} "
            f"{f'{claimed}/{len(indep)}':>14}"
        )
    print(
        f"claimed: p < alpha = 2^-64 = {DEFAULT_ALPHA:.3g}; independent models: claimed if p < {CLAIM_FLOOR:g}"
    )
    for scheme, (own, answered) in costs.items():
        print(
            f"benign top-1 accuracy, {scheme} watermark ({count:,} queries): model {own:.2%}, "
            f"answers {answered:.2%}, cost {own - answered:+.2%}"
        )


def run_scheme(
    scheme: str,
    args: argparse.Namespace,
    net: nn.Module,
    data: digits.DigitsData,
    independents: list[ModelSuspect],
    workdir: Path,
) -> tuple[list[Row], tuple[float, float]]:
    """Every budget against one scheme's deployment, then its benign cost."""
    eval_labels = _labels(net, data.train_x)
    rows = []
    with ExitStack() as stack:
        deployed = deploy(scheme, args, net, workdir, stack)
        for i, budget in enumerate(args.budgets):
            row = attack(
                deployed,
                budget,
                args.seed + 10 * i + 1,
                eval_labels,
                independents,
                data.train_x,
                data.test_x,
            )
            rows.append(row)
            print_table([row], {}, 0)
            print(f"    ({row.seconds:.0f} s)", flush=True)
        cost = benign_cost(deployed, data, args.benign, args.seed + 7)
    return rows, cost


def _labels(net: nn.Module, images: Images) -> np.ndarray:
    with torch.inference_mode():
        labels: np.ndarray = net(torch.from_numpy(images)).argmax(dim=1).numpy()
    return labels


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its table."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    configure_logging("WARNING", tier="bench")
    started = time.perf_counter()
    data = digits.load_data()
    net = digits.train(data)
    independents = independent_models(args.independent, args.seed)
    rows: list[Row] = []
    costs: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes:
            scheme_rows, costs[scheme] = run_scheme(
                scheme, args, net, data, independents, Path(tmp)
            )
            rows += scheme_rows
    print()
    print(
        f"label watermark: fraction {args.fraction:g} of queries with top-1 probability below "
        f"{args.max_confidence:g}, label-only policy; signal watermark: "
        f"amplitude {args.amplitude:g}, top-3 policy; {len(independents)} independent models "
        f"({', '.join(sorted({name for name, _ in ARCHITECTURES}))})"
    )
    print_table(rows, costs, args.benign)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
