"""Null calibration of the region-level ownership test (issue 14, item 2).

Independently trained models (other seeds, architectures and data subsets, trained on the true
labels, never on the API's answers) are tested as suspects under many freshly drawn watermark
keys; re-keying needs no training, since only the partition and the selection change. The
candidates are a natural thief's queries (held-out digits and augmented copies,
``bench.thieves.thief_pool``) as the digits model's front stage sends them (FP16). The test must
be valid: the share of p-values below 1e-3 at most 1e-3 (its upper 95% Clopper-Pearson bound at
most 2e-3). Prints that rate, the bound and a histogram of the p-values.

    .venv/bin/python bench/watermark_null.py                       # 20 models x 1,000 keys
    .venv/bin/python bench/watermark_null.py --models 4 --keys 100  # quicker
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

from bench.thieves import ARCHITECTURES, thief_pool
from private_core.watermark.engine import region_marker
from private_core.watermark.keys import WatermarkKey
from private_core.watermark.regions import top_two, unsure
from shared.manifest import WatermarkConfig
from splitvault.demo import digits
from splitvault.ownership.stats import region_test, region_votes

BINS = [0.0, 1e-6, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0 + 1e-12]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
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


def main(argv: Sequence[str] | None = None) -> None:
    """Run the calibration and print its result."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = digits.load_data()
    victim = digits.train(data)
    queries = thief_pool(data.test_x, args.candidates, args.seed + 1)
    with torch.inference_mode():
        back = victim.features[:2](torch.from_numpy(queries)).half().numpy()
        probabilities = torch.softmax(victim(torch.from_numpy(queries)).double(), 1).numpy()
    settings = WatermarkConfig()
    rows = np.flatnonzero(unsure(probabilities, settings.max_margin))
    pairs = top_two(probabilities[rows])
    suspects = independent(args.models, args.seed)
    answers = []
    for _, model in suspects:
        with torch.inference_mode():
            answers.append(model(torch.from_numpy(queries[rows])).argmax(dim=1).numpy())
    p_values = np.empty((args.keys, len(suspects)))
    for k in range(args.keys):
        marker = region_marker(WatermarkKey.generate(), settings)
        ids = marker.regions({"x": back[rows]}, pairs)
        chosen = dict(zip(ids, marker.selected(ids).tolist(), strict=True))
        for m, answer in enumerate(answers):
            distinct, votes = region_votes(ids, answer, pairs[:, 1])
            selected = np.array([chosen[r] for r in distinct], dtype=bool)
            p_values[k, m] = region_test(selected, votes).p_value
    report(p_values, len(rows), len(queries), suspects, time.perf_counter() - started)


def report(
    p_values: np.ndarray,
    voting: int,
    candidates: int,
    suspects: list[tuple[str, nn.Module]],
    seconds: float,
) -> None:
    """The rate of p < 1e-3, its upper bound, and the histogram."""
    total = p_values.size
    low = int((p_values < 1e-3).sum())
    upper = float(stats.beta.ppf(0.95, low + 1, total - low)) if low < total else 1.0
    print(
        f"{len(suspects)} independent models ({', '.join(sorted({n.split(' #')[0] for n, _ in suspects}))}) "
        f"x {p_values.shape[0]:,} fresh keys = {total:,} tests; {candidates:,} thief queries, "
        f"{voting:,} of them unsure (voting)"
    )
    print(
        f"p < 1e-3: {low} of {total:,} = {low / total:.2e} (upper 95% bound {upper:.2e}); "
        f"smallest p {p_values.min():.2e}; mean p {p_values.mean():.3f}"
    )
    counts, _ = np.histogram(p_values, bins=BINS)
    print("p-value histogram:")
    for lo, hi, count in zip(BINS[:-1], BINS[1:], counts, strict=True):
        bar = "#" * round(60 * count / total)
        print(f"  [{lo:<7.0e}, {min(hi, 1.0):<7.0e}) {count:>6,} {bar}")
    print(f"({seconds:.0f} s)")


if __name__ == "__main__":
    main()
