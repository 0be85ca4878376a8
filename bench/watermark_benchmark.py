"""Ownership watermark against thieves the project did not write, through the public API.

The digits model is packed with the default watermark (region marks, ``WatermarkConfig()``)
under the top-3 policy and both tiers are started (the extraction monitor set to ``record``,
so nothing blocks a thief: this measures the watermark, not the monitor). Thieves
(``bench/thieves.py``: IBM ART's CopycatCNN and KnockoffNets, hard and soft labels, ART's
defaults and the 1,500-step variant, other architectures, and adaptive thieves; hyperparameters
fixed there before the watermark was tuned) steal the model at each budget from a natural
pool (held-out digits and shifted, noisy, contrast-changed copies). Answers come from the API
in requests of 64; an answer depends only on the query, so each distinct query is asked once
and reused across thieves. For each copy: its fidelity (top-1 agreement with the model on the
training split, which no thief queried) and the region-level test's p-value with two candidate
sets: the thief's own queries (what sealed queries or discovery give) and the owner's data only
(the training split and four augmented copies of each). Independent models trained on the
true labels are tested on the same candidate sets (the smallest p-value is shown). Benign
cost: top-1 accuracy of the API's answers against the model's own, on the clean held-out
digits and on an augmented benign set.

    .venv/bin/python bench/watermark_benchmark.py            # default grid, ~15 min on 2 cores
    .venv/bin/python bench/watermark_benchmark.py --full     # every thief, 1k..50k queries
    .venv/bin/python bench/watermark_benchmark.py --grid art-defaults --budgets 2000 10000

The key is drawn as ``pack`` draws it (by benign cost on the demo's labelled data, at most 16
draws; ``watermark.choice.json``), and a copy counts as claimed as ``verify-ownership`` claims
it: p below alpha divided by the key draws.
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
import json
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.attacks import augment
from bench.thieves import (
    ART_DEFAULTS,
    DEFAULT_THIEVES,
    FULL_THIEVES,
    Images,
    Thief,
    steal,
    thief_pool,
)
from bench.watermark_null import independent
from private_core.watermark.keys import CHOICE_FILE
from shared.keys import LocalFileKeyProvider
from shared.logs import configure_logging
from shared.manifest import TopKPolicy, WatermarkConfig
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import start_both
from splitvault.ownership.owner import Candidates, OwnerModel
from splitvault.ownership.verify import TriggerCheck, Verification, verify_candidates

MODEL, BATCH, CLASSES = "digits", 64, 10
ALPHAS = {"1e-6": 1e-6, "2^-64": 2.0**-64}
UNLIMITED = '{"rate_per_s": 1e9, "burst": 1000000, "daily_budget": 1000000000}'
# Thief grids (``bench/thieves.py`` unchanged): ``non-adaptive`` is the default grid's Copycat
# hard / soft and KnockoffNets rows; ``art-defaults`` the same attacks and networks with ART's
# documented training defaults (batch 1, 10 epochs), hard and soft labels.
GRIDS: dict[str, list[Thief]] = {
    "default": DEFAULT_THIEVES,
    "full": FULL_THIEVES,
    "non-adaptive": [t for t in DEFAULT_THIEVES if t.adaptive == "none"],
    "art-defaults": [
        t
        for t in FULL_THIEVES
        if t.training == ART_DEFAULTS
        and t.adaptive == "none"
        and (t.attack, t.architecture) in {("copycat", "victim CNN"), ("knockoff-random", "MLP")}
    ],
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    parser.add_argument("--full", action="store_true", help="every thief, budgets 1k..50k")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default", help="which thieves")
    parser.add_argument("--independent", type=int, default=4, help="independent models")
    parser.add_argument("--benign", type=int, default=5000, help="augmented benign queries")
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


class ApiOracle:
    """The public API as a thief's oracle: top-3 scores, the rest spread over the others."""

    def __init__(self, sdk: Any) -> None:
        self.sdk, self.asked = sdk, 0
        self.cache: dict[bytes, np.ndarray] = {}

    def __call__(self, images: Images) -> np.ndarray:
        keys = [row.tobytes() for row in images]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        rows = {k: i for i, k in enumerate(keys)}
        for start in range(0, len(missing), BATCH):
            chunk = missing[start : start + BATCH]
            prediction = self.sdk.predict(MODEL, images[[rows[k] for k in chunk]])
            self.asked += len(chunk)
            for key, index, score in zip(chunk, prediction.indices, prediction.scores, strict=True):
                row = np.full(CLASSES, max(0.0, 1.0 - float(score.sum())) / (CLASSES - len(index)))
                row[index] = score
                self.cache[key] = row.astype(np.float32)
        return np.stack([self.cache[k] for k in keys])


@dataclass
class Deployed:
    """The running deployment and the owner's view of it."""

    url: str
    ca: Path
    keys: Any  # SqliteKeyStore
    owner: OwnerModel
    private_model: Path  # the model's private folder (key, ``watermark.choice.json``)


def deploy(net: nn.Module, workdir: Path, stack: ExitStack) -> Deployed:
    """Pack the model with the default watermark and start both tiers."""
    from public_api.keys import SqliteKeyStore

    layout = init_deployment(workdir / "wm")
    pack_spec_default(net, layout)
    env = {
        "SPLITVAULT_PRIVATE_TORCH_THREADS": "1",
        "SPLITVAULT_PUBLIC_TORCH_THREADS": "1",
        "SPLITVAULT_PUBLIC_PROTECTION__MONITOR_ACTION": "record",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__RATE_PER_S": "100000",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__BURST": "100000",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__DAILY_QUOTA": "1000000000",
        # The private tier's own budgets out of the way too (20,000+ queries in minutes).
        **{
            f"SPLITVAULT_PRIVATE_ADMISSION__{name}": UNLIMITED
            for name in ("IDENTITY", "UNSIGNED", "KEY")
        },
    }
    public, _ = start_both(layout.root, stack, env=env)
    keys = SqliteKeyStore(layout.public.root / "state" / "keys.sqlite3")
    stack.callback(keys.close)
    owner = OwnerModel(layout.root, MODEL)
    return Deployed(
        f"https://localhost:{public.port}",
        layout.public.ca_cert,
        keys,
        owner,
        layout.private.model(MODEL),
    )


def pack_spec_default(net: nn.Module, layout: Any) -> None:
    """The digits model, top-3 policy, the default watermark."""
    from splitvault.packing.pack import pack_spec

    pack_spec(
        digits.spec_for(net, digits.load_data()),
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(k=3),
        show_progress=False,
        watermark=WatermarkConfig(),
    )


def key_choice(deployed: Deployed) -> str:
    """How ``pack`` drew the key (``watermark.choice.json``) and the draws the verifier uses."""
    choice = json.loads((deployed.private_model / CHOICE_FILE).read_text())
    return (
        f"key {choice['key_id']}, {choice['draws']} draw(s), benign cost on the pack data "
        f"{choice.get('benign_cost', float('nan')):+.2%}; verifier's key_draws "
        f"{deployed.owner.key_draws}"
    )


def client(deployed: Deployed, name: str) -> Any:
    """An SDK client with a fresh key (high limits) that accepted the terms."""
    from splitvault_client import Client

    _, secret = deployed.keys.create(name, rate_per_s=1e6, burst=10**6, daily_quota=10**9)
    sdk = Client(deployed.url, api_key=secret, ca=deployed.ca, timeout=60)
    sdk.accept_terms(sdk.terms().version)
    return sdk


def benign_cost(oracle: ApiOracle, owner: OwnerModel, images: Images, truth: np.ndarray) -> str:
    """The model's own top-1 accuracy, the API's, and the share of answers marked."""
    answered = oracle(images).argmax(axis=1)
    own = owner.probabilities(owner.back_inputs({"image": images})).argmax(axis=1)
    a, b = float((own == truth).mean()), float((answered == truth).mean())
    return (
        f"model {a:.2%}, answers {b:.2%}, cost {a - b:+.2%}, marked {(own != answered).mean():.2%}"
    )


@dataclass
class Row:
    """One (thief, budget) result."""

    thief: Thief
    budget: int
    fidelity: float
    p_thief: float
    p_owner: float
    votes_thief: str
    votes_owner: str
    independent_min: float
    log: str
    claimed_thief: dict[str, bool]  # verify-ownership's verdict at each of ALPHAS
    claimed_owner: dict[str, bool]


def verify(owner: OwnerModel, candidates: Candidates, model: nn.Module) -> tuple[float, str]:
    """The region test's p-value and its selected votes (matches / selected regions)."""
    return _summary(verification(owner, candidates, model))


def verification(owner: OwnerModel, candidates: Candidates, model: nn.Module) -> Verification:
    """``verify-ownership``'s verification of ``model`` (the trigger log not consulted)."""
    suspect = ModelSuspect("suspect", model)
    return verify_candidates(owner, candidates, suspect, triggers=TriggerCheck(0, 0))


def claimed_at(found: Verification) -> dict[str, bool]:
    """Whether ``verify-ownership`` claims the copy at each of ``ALPHAS`` (its threshold shares
    alpha among the key draws made at pack)."""
    return {name: replace(found, alpha=alpha).claimed for name, alpha in ALPHAS.items()}


def run(args: argparse.Namespace, deployed: Deployed, oracle: ApiOracle) -> list[Row]:
    """Every thief at every budget."""
    data = digits.load_data()
    owner = deployed.owner
    net_labels = owner.probabilities(owner.back_inputs({"image": data.train_x})).argmax(axis=1)
    rng = np.random.default_rng(args.seed + 5)
    own_data = np.concatenate(
        [data.train_x, *(np.stack([augment(x, rng) for x in data.train_x]) for _ in range(4))]
    )
    own_candidates = owner.candidates({"image": own_data}, owner.marker())
    pool = thief_pool(data.test_x, max(args.budgets), args.seed + 1)
    pool_labels = np.resize(
        data.test_y, len(pool)
    )  # the thief's own labels (KnockoffNets adaptive)
    others = [m for _, m in independent(args.independent, args.seed)]
    rows = []
    for thief in FULL_THIEVES if args.full else GRIDS[args.grid]:
        for budget in args.budgets:
            started = time.perf_counter()
            stolen = steal(thief, oracle, pool[:budget], pool_labels[:budget], args.seed)
            candidates = owner.candidates({"image": stolen.queries}, owner.marker())
            on_thief = verification(owner, candidates, stolen.model)
            on_owner = verification(owner, own_candidates, stolen.model)
            p_thief, v_thief = _summary(on_thief)
            p_owner, v_owner = _summary(on_owner)
            indep = min(
                verify(owner, c, m)[0] for m in others for c in (candidates, own_candidates)
            )
            with torch.inference_mode():
                copy = stolen.model(torch.from_numpy(data.train_x)).argmax(dim=1).numpy()
            log = f"{int(candidates.marks.selected.sum())}"
            row = Row(
                thief, budget, float((copy == net_labels).mean()), p_thief, p_owner,
                v_thief, v_owner, indep, log, claimed_at(on_thief), claimed_at(on_owner),
            )  # fmt: skip
            rows.append(row)
            print_row(row, time.perf_counter() - started)
    return rows


def _summary(found: Verification) -> tuple[float, str]:
    result = found.results[0]
    return result.p_value, f"{result.matches}/{result.trials} vs {result.chance_rate:.0%}"


def print_row(row: Row, seconds: float) -> None:
    """One line of the table."""
    print(
        f"{row.thief.name:<58} {row.budget:>6,} {row.fidelity:>7.1%} "
        f"{row.p_thief:>9.2g} {row.votes_thief:>15} {row.p_owner:>9.2g} {row.votes_owner:>15} "
        f"{row.independent_min:>9.2g} ({seconds:.0f} s)",
        flush=True,
    )


def queries_to_claim(rows: list[Row]) -> None:
    """The smallest budget at which each thief's copy is claimed, per alpha and candidate set."""
    print(
        "\nqueries to claim (smallest budget verify-ownership claims at, alpha over the key "
        "draws; '-' = none tested):"
    )
    print(
        f"{'thief':<58} {'thief q 1e-6':>12} {'thief q 2^-64':>13} {'owner 1e-6':>10} {'owner 2^-64':>11}"
    )
    for thief in dict.fromkeys(r.thief for r in rows):
        mine = [r for r in rows if r.thief == thief]
        cells = [
            next((f"{r.budget:,}" for r in mine if getattr(r, f"claimed_{kind}")[alpha]), "-")
            for kind in ("thief", "owner")
            for alpha in ALPHAS
        ]
        print(f"{thief.name:<58} {cells[0]:>12} {cells[1]:>13} {cells[2]:>10} {cells[3]:>11}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its tables."""
    args = parse_args(argv)
    if args.full:
        args.budgets = [1000, 2000, 5000, 10000, 20000, 50000]
    torch.set_num_threads(1)
    configure_logging("WARNING", tier="bench")
    started = time.perf_counter()
    data = digits.load_data()
    net = digits.train(data)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        deployed = deploy(net, Path(tmp), stack)
        oracle = ApiOracle(client(deployed, "thieves"))
        settings = WatermarkConfig()
        print(
            f"watermark: region marks, {settings.region_dims} keyed projections in cells of "
            f"{settings.region_cell}, {settings.region_fraction:.0%} of regions selected, runner-up "
            f"where the top-1 leads by < {settings.max_margin}; top-3 policy"
        )
        print(f"key as pack chose it: {key_choice(deployed)}")
        pool = np.concatenate([data.train_x, data.test_x])
        labels = np.concatenate([data.train_y, data.test_y])
        rng = np.random.default_rng(args.seed + 7)
        picked = rng.integers(len(pool), size=args.benign)
        augmented = np.stack(
            [augment(pool[i], rng) if rng.random() < 0.8 else pool[i] for i in picked]
        )
        print(
            f"benign, clean held-out ({len(data.test_x)}): {benign_cost(oracle, deployed.owner, data.test_x, data.test_y)}"
        )
        print(
            f"benign, augmented ({args.benign:,}): {benign_cost(oracle, deployed.owner, augmented, labels[picked])}"
        )
        print(
            f"{'thief':<58} {'budget':>6} {'fidelity':>7} {'p thief q':>9} {'votes (sel)':>15} "
            f"{'p owner':>9} {'votes (sel)':>15} {'indep min':>9}"
        )
        rows = run(args, deployed, oracle)
    queries_to_claim(rows)
    print(f"(API asked {oracle.asked:,} distinct queries; {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
