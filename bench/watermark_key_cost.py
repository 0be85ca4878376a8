"""Benign cost of the watermark keys ``splitvault pack`` chooses, against the first key drawn.

In process, no servers: the digits model is trained and split as ``pack`` splits it (top-3
policy, the default watermark), and answers are computed as the private tier computes them
(``private_core.watermark.benign``: FP16 back-stage inputs, ``ModelWatermark.marking``,
``apply_policy``). Each round draws keys by the pack rule (``choose_key`` on the demo's benign
data: the training split and four augmented copies of each) and records the first key of the
round too (the rule before: keep the first key drawn), so both are measured side by side on the
same held-out sets: the 450 clean held-out digits and the 5,000 augmented benign queries of
``bench/watermark_diagnosis.py`` (seed 7). About 10 s a round on a shared 2-core host.

    .venv/bin/python bench/watermark_key_cost.py --rounds 8
    .venv/bin/python bench/watermark_key_cost.py --keys 48   # random keys: how costs correlate
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
from collections.abc import Sequence

import numpy as np
import structlog
import torch

from private_core.watermark.benign import MAX_DRAWS, BenignChunk, benign_cost, choose_key
from private_core.watermark.keys import WatermarkKey
from shared.manifest import ModelConfig, TopKPolicy, WatermarkConfig
from splitvault.demo import digits
from splitvault.packing.spec import BenignData
from splitvault.packing.split import export_model, split_program
from splitvault.packing.watermark_key import benign_chunks


def benign_set(data: digits.DigitsData) -> tuple[np.ndarray, np.ndarray]:
    """The augmented benign queries of ``watermark_diagnosis.benign`` (same seed and draws)."""
    pool = np.concatenate([data.train_x, data.test_x])
    labels = np.concatenate([data.train_y, data.test_y])
    rng = np.random.default_rng(7)
    picked = rng.integers(len(pool), size=5000)
    aug = np.stack(
        [digits.augment(pool[i], rng) if rng.random() < 0.8 else pool[i] for i in picked]
    )
    return aug, labels[picked]


def main(argv: Sequence[str] | None = None) -> None:
    """Print one row per round: the chosen key and the first key, each on three sets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--keys", type=int, default=0, help="instead: this many random keys")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    torch.set_num_threads(1)
    data = digits.load_data()
    spec = digits.spec_for(digits.train(data), data)
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
    if own is None:
        raise SystemExit("the digits spec has no benign data")
    aug_x, aug_y = benign_set(data)
    sets: dict[str, list[BenignChunk]] = {
        "pack data": benign_chunks(pair, config, own),
        "clean held-out": benign_chunks(
            pair,
            config,
            BenignData({"image": torch.from_numpy(data.test_x)}, torch.from_numpy(data.test_y)),
        ),
        "augmented": benign_chunks(
            pair, config, BenignData({"image": torch.from_numpy(aug_x)}, torch.from_numpy(aug_y))
        ),
    }
    if args.keys:
        random_keys(config, sets, args.keys)
        return
    print("| round | key | draws | " + " | ".join(sets) + " |")
    print("|---|---|---|" + "---|" * len(sets))
    for round_ in range(args.rounds):
        keys = [WatermarkKey.generate() for _ in range(MAX_DRAWS)]
        choice = choose_key(config, sets["pack data"], generate=iter(keys).__next__)
        for name, key in (("chosen", choice.key), ("first", keys[0])):
            costs = " | ".join(f"{benign_cost(config, key, s):+.2%}" for s in sets.values())
            print(f"| {round_} | {name} | {choice.draws} | {costs} |", flush=True)


def random_keys(config: ModelConfig, sets: dict[str, list[BenignChunk]], count: int) -> None:
    """Each random key's cost on every set; correlations, and the held-out costs of the keys
    within each bound on the pack data."""
    costs = np.array(
        [[benign_cost(config, k, s) for s in sets.values()] for k in map(_fresh, range(count))]
    )
    print("correlation (pack data, clean held-out, augmented):")
    print(np.corrcoef(costs.T).round(2))
    for bound in (0.002, 0.0025, 0.003, 1.0):
        within = costs[costs[:, 0] <= bound + 1e-12]
        if len(within):
            print(
                f"pack data <= {bound:.2%}: {len(within)} keys; clean max {within[:, 1].max():+.2%}"
                f" (> 0.5%: {(within[:, 1] > 0.005).sum()}), augmented max {within[:, 2].max():+.2%}"
            )


def _fresh(_: int) -> WatermarkKey:
    return WatermarkKey.generate()


if __name__ == "__main__":
    main()
