"""Null calibration of the region-level ownership test (issue 14, item 2), keys chosen as pack does.

Independently trained models (other seeds, architectures and data subsets, trained on the true
labels, never on the API's answers) are tested as suspects under many freshly drawn watermark
keys; re-keying needs no training, since only the partition and the selection change. Each key
is drawn as ``splitvault pack`` draws it: ``choose_key`` (benign cost at most 0.25% on the
demo's labelled pack data, at most 16 draws), and each test is judged as ``verify-ownership``
judges it (``Verification.claimed``: alpha shared among the key draws). The choice depends only
on the key and the owner's model and data, never on a suspect, so each chosen key is tested
against every independent model. The first key of each round (the key an unchecked pack keeps)
is tested too, side by side. The candidates are a natural thief's queries (held-out digits and
augmented copies, ``bench.thieves.thief_pool``) as the digits model's front stage sends them
(FP16). The test must be valid: the share of p-values below 1e-3 at most 1e-3 (its upper 95%
Clopper-Pearson bound at most 2e-3). Prints those rates, the bounds and the p-value histograms.

Shortcut (exact, checked on the first rounds): a key's marks touch only the samples where the
model is unsure (``regions.unsure``), so its benign cost is computed on those rows of the pack
data alone, against a bound scaled by all rows over unsure rows; ``choose_key`` itself decides.

    nice -n 10 .venv/bin/python bench/watermark_null.py                      # 20 models x 1,000 keys
    .venv/bin/python bench/watermark_null.py --models 4 --keys 100            # quicker
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch
from scipy import stats
from torch import nn

from bench.thieves import ARCHITECTURES, thief_pool
from private_core.watermark.benign import BOUND, MAX_DRAWS, BenignChunk, benign_cost, choose_key
from private_core.watermark.engine import region_marker
from private_core.watermark.keys import WatermarkKey
from private_core.watermark.regions import top_two, unsure
from shared.manifest import ModelConfig, TopKPolicy, WatermarkConfig
from splitvault.demo import digits
from splitvault.ownership.stats import SchemeResult, region_test, region_votes
from splitvault.ownership.verify import TriggerCheck, Verification
from splitvault.packing.spec import BenignData
from splitvault.packing.split import StagePair, export_model, split_program
from splitvault.packing.watermark_key import benign_chunks

ALPHA = 1e-3  # the calibration's level: the rate of p < ALPHA must be at most ALPHA
BINS = [0.0, 1e-6, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0 + 1e-12]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=int, default=3, help="keys the shortcut is checked on")
    return parser.parse_args(argv)


def independent(count: int, seed: int) -> list[tuple[str, nn.Module]]:
    """Models trained on the true labels: each its own architecture, seed and data split."""
    names = list(ARCHITECTURES)
    models = []
    for i in range(count):
        name = names[i % len(names)]
        data = digits.load_data(seed=seed + 100 + i)
        torch.manual_seed(seed + 1000 + i)
        model = ARCHITECTURES[name]()
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
        for _ in range(15):
            for batch in torch.randperm(len(y)).split(64):  # type: ignore[no-untyped-call]
                optimiser.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()  # type: ignore[no-untyped-call]
                optimiser.step()
        models.append((f"{name} #{i}", model.eval()))
    return models


@dataclass(frozen=True)
class OwnerData:
    """The owner's pack data reduced to the rows a key can mark, and how a draw is timed."""

    pair: StagePair
    config: ModelConfig
    unsure_chunks: list[BenignChunk]
    bound: float  # BOUND scaled by all rows over unsure rows
    rows: int
    kept: int  # of them unsure


def owner_data(victim: nn.Module, data: digits.DigitsData, check_keys: int) -> OwnerData:
    """The demo's pack data as the private tier computes it (``benign_chunks``), reduced to its
    unsure rows; the reduction is checked exact on ``check_keys`` keys and both are timed."""
    spec = digits.spec_for(victim, data)
    pair = split_program(export_model(spec), digits.SPLIT, spec.dynamic_dims)
    config = ModelConfig.model_validate(
        {
            "name": "digits",
            "split": digits.SPLIT,
            "task": "classification",
            "policy": TopKPolicy(k=3),
            "labels": digits.LABELS,
            "watermark": WatermarkConfig(),
        }
    )
    own = spec.benign_data()
    if own is None or config.watermark is None:
        raise SystemExit("the digits spec has no benign data")
    full = benign_chunks(pair, config, own)
    reduced = [unsure_rows(full, config.watermark.max_margin)]
    rows, kept = sum(len(c.labels) for c in full), sum(len(c.labels) for c in reduced)
    seconds = {"full": 0.0, "unsure rows": 0.0}
    for _ in range(check_keys):
        key = WatermarkKey.generate()
        t0 = time.perf_counter()
        whole = benign_cost(config, key, full)
        t1 = time.perf_counter()
        part = benign_cost(config, key, reduced) * kept / rows
        seconds["full"] += t1 - t0
        seconds["unsure rows"] += time.perf_counter() - t1
        if round(whole * rows) != round(part * rows):
            raise SystemExit(f"the unsure-row shortcut is not exact: {whole} vs {part}")
    print(
        f"pack data: {rows:,} labelled samples, {kept:,} unsure; one key's benign cost "
        + ", ".join(f"{name} {s / max(1, check_keys):.2f} s" for name, s in seconds.items())
        + f" (equal on {check_keys} keys)"
    )
    return OwnerData(pair, config, reduced, BOUND * rows / kept, rows, kept)


def unsure_rows(chunks: list[BenignChunk], max_margin: float) -> BenignChunk:
    """The rows of ``chunks`` where the model is unsure, as one chunk."""
    output = torch.cat([c.output for c in chunks])
    probabilities = torch.softmax(output.to(torch.float64), dim=-1).numpy()
    rows = np.flatnonzero(unsure(probabilities, max_margin))
    inputs = {
        name: np.concatenate([np.asarray(c.inputs[name]) for c in chunks])[rows]
        for name in chunks[0].inputs
    }
    labels = np.concatenate([c.labels for c in chunks])[rows]
    return BenignChunk(inputs, output[torch.from_numpy(rows)], labels)


def chosen_keys(owner: OwnerData, count: int) -> list[tuple[WatermarkKey, int, WatermarkKey]]:
    """``count`` keys drawn by the pack rule: (chosen key, draws, first key of the round)."""
    keys = []
    for _ in range(count):
        drawn = [WatermarkKey.generate() for _ in range(MAX_DRAWS)]  # fresh; used in order
        choice = choose_key(
            owner.config, owner.unsure_chunks, bound=owner.bound, max_draws=MAX_DRAWS,
            generate=iter(drawn).__next__,
        )  # fmt: skip
        keys.append((choice.key, choice.draws, drawn[0]))
    return keys


def main(argv: Sequence[str] | None = None) -> None:
    """Run the calibration and print its result."""
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = digits.load_data()
    victim = digits.train(data)
    owner = owner_data(victim, data, args.check)
    choosing = time.perf_counter()
    keys = chosen_keys(owner, args.keys)
    choosing = time.perf_counter() - choosing
    draws = np.array([d for _, d, _ in keys])
    print(
        f"{args.keys:,} keys chosen in {choosing:.0f} s ({choosing / args.keys:.2f} s a key): "
        f"draws mean {draws.mean():.1f}, median {np.median(draws):.0f}, "
        f"all 16 over the bound in {(draws == MAX_DRAWS).sum()}"
    )
    queries = thief_pool(data.test_x, args.candidates, args.seed + 1)
    back, pairs = voting_candidates(owner, queries, np.resize(data.test_y, len(queries)))
    suspects = independent(args.models, args.seed)
    answers = []
    for _, model in suspects:
        with torch.inference_mode():
            answers.append(model(torch.from_numpy(queries[back.rows])).argmax(dim=1).numpy())
    chosen = np.empty((args.keys, len(suspects)))
    first = np.empty_like(chosen)
    claimed = np.zeros_like(chosen, dtype=bool)
    for k, (key, count, first_key) in enumerate(keys):
        results = region_results(owner, key, back, pairs, answers)
        chosen[k] = [r.p_value for r in results]
        for m, ((name, _), result) in enumerate(zip(suspects, results, strict=True)):
            verification = Verification(
                "digits", name, 0, 0, ALPHA, [result], TriggerCheck(0, 0), key_draws=count
            )
            claimed[k, m] = verification.claimed
        if first_key is key:
            first[k] = chosen[k]
        else:
            first[k] = [r.p_value for r in region_results(owner, first_key, back, pairs, answers)]
    print(
        f"{len(suspects)} independent models ({', '.join(sorted({n.split(' #')[0] for n, _ in suspects}))}) "
        f"x {args.keys:,} keys = {chosen.size:,} tests; {len(queries):,} thief queries, "
        f"{len(back.rows):,} of them unsure (voting)"
    )
    report("chosen key (pack's rule): p as the region test reports it", chosen)
    corrected = np.minimum(1.0, chosen * draws[:, None])
    report("chosen key: p times its key draws (verify-ownership's claim)", corrected, claimed)
    report("first key of each round (no choice): p", first)
    print(f"({time.perf_counter() - started:.0f} s)")


@dataclass(frozen=True)
class Voting:
    """The unsure thief queries' back-stage inputs, as the private tier receives them."""

    inputs: dict[str, np.ndarray]
    rows: np.ndarray  # their rows among the queries


def voting_candidates(
    owner: OwnerData, queries: np.ndarray, labels: np.ndarray
) -> tuple[Voting, np.ndarray]:
    """The thief's queries through the front stage and the transport datatype
    (``benign_chunks``), kept where the model is unsure; and their top two classes."""
    batch = BenignData({"image": torch.from_numpy(queries)}, torch.from_numpy(labels))
    chunks = benign_chunks(owner.pair, owner.config, batch)
    output = torch.cat([c.output for c in chunks])
    probabilities = torch.softmax(output.to(torch.float64), dim=-1).numpy()
    settings = owner.config.watermark or WatermarkConfig()
    rows = np.flatnonzero(unsure(probabilities, settings.max_margin))
    inputs = {
        name: np.concatenate([np.asarray(c.inputs[name]) for c in chunks])[rows]
        for name in chunks[0].inputs
    }
    return Voting(inputs, rows), top_two(probabilities[rows])


def region_results(
    owner: OwnerData,
    key: WatermarkKey,
    voting: Voting,
    pairs: np.ndarray,
    answers: list[np.ndarray],
) -> list[SchemeResult]:
    """The region test for each independent model's answers under ``key`` (as
    ``verify-ownership``'s ``_region_test``: one vote per distinct region)."""
    marker = region_marker(key, owner.config.watermark or WatermarkConfig())
    ids = marker.regions(voting.inputs, pairs)
    chosen = dict(zip(ids, marker.selected(ids).tolist(), strict=True))
    results = []
    for answer in answers:
        distinct, votes = region_votes(ids, answer, pairs[:, 1])
        selected = np.array([chosen[r] for r in distinct], dtype=bool)
        results.append(region_test(selected, votes))
    return results


def report(title: str, p_values: np.ndarray, claimed: np.ndarray | None = None) -> None:
    """The rate of p < 1e-3 (or of claims), its upper 95% bound, and the histogram."""
    total = p_values.size
    low = int((p_values < ALPHA).sum() if claimed is None else claimed.sum())
    upper = float(stats.beta.ppf(0.95, low + 1, total - low)) if low < total else 1.0
    what = "p < 1e-3" if claimed is None else "claimed at alpha 1e-3"
    print(f"\n{title}")
    print(
        f"{what}: {low} of {total:,} = {low / total:.2e} (upper 95% bound {upper:.2e}); "
        f"p < 1e-2 {(p_values < 1e-2).mean():.2%}, p < 0.05 {(p_values < 0.05).mean():.2%}; "
        f"smallest p {p_values.min():.2e}; mean p {p_values.mean():.3f}"
    )
    counts, _ = np.histogram(p_values, bins=BINS)
    print("p-value histogram:")
    for lo, hi, count in zip(BINS[:-1], BINS[1:], counts, strict=True):
        bar = "#" * round(60 * count / total)
        print(f"  [{lo:<6.2g}, {min(hi, 1.0):<6.2g}) {count:>6,} {bar}")


if __name__ == "__main__":
    main()
