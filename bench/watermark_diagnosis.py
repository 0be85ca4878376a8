"""Why the region watermark's p-value rises with the thief's budget (issue 14, item 1).

In process, no servers: the digits model's answers are marked exactly as the private tier marks
them (``RegionMarker``, ``top_two`` and ``unsure`` from ``private_core.watermark.regions`` on the
FP16 back-stage inputs), hard labels only, and ART's CopycatCNN (``bench/thieves.py``, hard
labels, 1,500 Adam steps, hyperparameters unchanged) steals the model at each budget from
``thief_pool``. Each thief query is an augmented copy of one of 450 held-out digits, so a query
has *siblings* (the other copies of its digit) that the thief also trains on. For each design
(``dims,cell,margin,fraction``), key and budget it prints:

* marked: the share of the thief's queries answered with the runner-up;
* siblings alike: for each marked query, the share of its siblings answered alike (a mark the
  copy can learn as part of the function is shared by most of its neighbours);
* reproduced: the copy's answer equals the marked answer on the marked queries it trained on,
  overall and split by sibling agreement (< 25%, >= 75%) and by the model's margin;
* the region test's p-value (one vote per region) with the thief's queries as candidates, with
  the owner's data only (training split plus four augmented copies of each), and with 20,000
  unsure points between the owner's images of two classes (``between_classes``).

Benign cost (top-1 accuracy lost on the 450 clean held-out digits and on 5,000 augmented ones)
is printed per design and key. About 40 s per design, key and budget on a shared 2-core host.

    .venv/bin/python bench/watermark_diagnosis.py                      # the default design
    .venv/bin/python bench/watermark_diagnosis.py --designs 4,0.5,0.5,0.3 1,8,0.9,0.3 --keys 3
    .venv/bin/python bench/watermark_diagnosis.py --pooled --designs 4,0.5,0.5,0.3  # shift-stable
    .venv/bin/python bench/watermark_diagnosis.py --adaptive --budgets 10000       # adaptive thieves
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from bench.attacks import augment
from bench.thieves import STEPS_1500, Adaptive, Images, Thief, _augment, steal, thief_pool
from private_core.watermark.keys import WatermarkKey
from private_core.watermark.regions import RegionMarker, top_two, unsure
from shared.manifest import WatermarkConfig
from splitvault.demo import digits
from splitvault.ownership.stats import region_test, region_votes

CLASSES = 10
SYNTHESIZED = 20000  # owner candidates between classes


@dataclass(frozen=True)
class Design:
    """A region-mark design: partition, unsure margin and selected fraction."""

    dims: int
    cell: float
    margin: float
    fraction: float

    @classmethod
    def parse(cls, text: str) -> Design:
        """``dims,cell,margin,fraction``."""
        dims, cell, margin, fraction = text.split(",")
        return cls(int(dims), float(cell), float(margin), float(fraction))


class Victim:
    """The digits model as the private tier sees it: FP16 back-stage inputs, softmax."""

    def __init__(self, net: digits.DigitsCNN, pooled: bool = False) -> None:
        self.net, self.pooled = net, pooled

    def space(self, back: np.ndarray) -> dict[str, np.ndarray]:
        """What the partition projects: the activations, or (``--pooled``) each channel's mean
        over positions, which a one-pixel shift hardly moves."""
        return {"x": back.astype(np.float32).mean(axis=(2, 3)) if self.pooled else back}

    def view(self, images: Images) -> tuple[np.ndarray, npt.NDArray[np.float64]]:
        """Back-stage inputs and the model's probabilities."""
        with torch.inference_mode():
            back = self.net.features[:2](torch.from_numpy(images)).half()
            logits = self.net.classifier(self.net.features[2:](back.float()))
            return back.numpy(), torch.softmax(logits.double(), 1).numpy()

    def answer(self, marker: RegionMarker, margin: float, images: Images) -> tuple[np.ndarray, ...]:
        """Top-1 answered (runner-up where marked), the mask of marked rows, the margins."""
        back, probabilities = self.view(images)
        pairs = top_two(probabilities)
        ids = marker.regions(self.space(back), pairs)
        marked = marker.selected(ids) & unsure(probabilities, margin)
        ordered = np.sort(probabilities, axis=1)
        return np.where(marked, pairs[:, 1], pairs[:, 0]), marked, ordered[:, -1] - ordered[:, -2]


def siblings(natural: Images, count: int, seed: int) -> npt.NDArray[np.int64]:
    """The held-out digit each query of ``thief_pool(natural, count, seed)`` was made from."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(natural))
    base = list(order[:count])
    while len(base) < count:
        index = int(rng.integers(len(natural)))
        _augment(natural[index], rng)  # the same draws as thief_pool
        base.append(index)
    return np.array(base, dtype=np.int64)


def region_p(
    victim: Victim, marker: RegionMarker, margin: float, model: torch.nn.Module, images: Images
) -> str:
    """The region test (one vote per region) on ``images`` as candidates."""
    back, probabilities = victim.view(images)
    rows = np.flatnonzero(unsure(probabilities, margin))
    pairs = top_two(probabilities[rows])
    ids = marker.regions(victim.space(back[rows]), pairs)
    chosen = dict(zip(ids, marker.selected(ids).tolist(), strict=True))
    with torch.inference_mode():
        answers = model(torch.from_numpy(images[rows])).argmax(1).numpy()
    distinct, votes = region_votes(ids, answers, pairs[:, 1])
    result = region_test(np.array([chosen[r] for r in distinct], dtype=bool), votes)
    return f"p={result.p_value:.2g} ({result.matches}/{result.trials} vs {result.chance_rate:.0%})"


def share(mask: npt.NDArray[np.bool_], hits: npt.NDArray[np.bool_]) -> str:
    """``hits`` among ``mask`` as a percentage with its count."""
    return f"{hits[mask].mean():.0%} of {int(mask.sum())}" if mask.any() else "- of 0"


def diagnose(
    victim: Victim, data: digits.DigitsData, marker: RegionMarker, design: Design, budget: int
) -> str:
    """One thief at one budget: marks, sibling agreement, reproduction, p-values."""
    pool, base = thief_pool(data.test_x, budget, 1), siblings(data.test_x, budget, 1)
    answered, marked, margins = victim.answer(marker, design.margin, pool)

    def oracle(images: Images) -> np.ndarray:
        one_hot: np.ndarray = np.eye(CLASSES, dtype=np.float32)[
            victim.answer(marker, design.margin, images)[0]
        ]
        return one_hot

    stolen = steal(Thief("copycat", False, STEPS_1500), oracle, pool, data.test_y[:1], 0)
    with torch.inference_mode():
        copy = stolen.model(torch.from_numpy(pool)).argmax(1).numpy()
        train = stolen.model(torch.from_numpy(data.train_x)).argmax(1).numpy()
    fidelity = float((train == victim.view(data.train_x)[1].argmax(1)).mean())
    rows = np.flatnonzero(marked)
    alike = np.array([(answered[base == base[i]] == answered[i]).mean() for i in rows])
    count = np.array([(base == base[i]).sum() - 1 for i in rows])
    same = copy[rows] == answered[rows]
    m = margins[rows]
    own = np.concatenate([data.train_x, *(augmented(data.train_x, 11 + j) for j in range(4))])
    between = between_classes(
        data.train_x,
        lambda x: victim.view(x)[1],
        SYNTHESIZED,
        design.margin,
        np.random.default_rng(3),
    )
    return (
        f"  {budget:>6,}: fidelity {fidelity:.1%}, marked {marked.mean():.1%}, siblings per "
        f"marked query {np.median(count) if len(count) else 0:.0f} (median), alike "
        f"{alike.mean() if len(alike) else 0:.0%}; reproduced {share(same == same, same)} "
        f"[siblings alike <25%: {share(alike < 0.25, same)}, >=75%: {share(alike >= 0.75, same)};"
        f" margin <0.25: {share(m < 0.25, same)}, >=0.25: {share(m >= 0.25, same)}]\n"
        f"          thief q {region_p(victim, marker, design.margin, stolen.model, pool)}; "
        f"owner {region_p(victim, marker, design.margin, stolen.model, own)}; owner, "
        f"{len(between):,} between classes {region_p(victim, marker, design.margin, stolen.model, between)}"
    )


def adaptive(
    victim: Victim, data: digits.DigitsData, marker: RegionMarker, design: Design, budget: int
) -> None:
    """Each adaptive thief of ``bench/thieves.py`` (hyperparameters unchanged): its fidelity,
    what it gave up against plain Copycat (hard labels), and the region test's p-values."""
    pool = thief_pool(data.test_x, budget, 1)
    truth = victim.view(data.train_x)[1].argmax(1)
    own = np.concatenate([data.train_x, *(augmented(data.train_x, 11 + j) for j in range(4))])
    plain = 0.0
    kinds: tuple[Adaptive, ...] = (
        "none", "noise-vote", "smoothing", "early-stop", "confident", "disagree",
    )  # fmt: skip
    for kind in kinds:
        thief = Thief("copycat", False, STEPS_1500, adaptive=kind)
        # The adaptive thieves read the top score: give them what the API gives (top-3 policy).
        stolen = steal(thief, _scored(victim, marker, design), pool, data.test_y[:1], 0)
        with torch.inference_mode():
            copy = stolen.model(torch.from_numpy(data.train_x)).argmax(1).numpy()
        fidelity = float((copy == truth).mean())
        plain = fidelity if kind == "none" else plain
        print(
            f"  {budget:>6,} {kind:<11} fidelity {fidelity:.1%} (gave up {plain - fidelity:+.1%}); "
            f"thief q {region_p(victim, marker, design.margin, stolen.model, stolen.queries)}; "
            f"owner {region_p(victim, marker, design.margin, stolen.model, own)}",
            flush=True,
        )


def _scored(victim: Victim, marker: RegionMarker, design: Design) -> Callable[[Images], np.ndarray]:
    """The API's answer as a thief sees it: the marked class first with the model's sorted top-3
    scores, the rest of the probability spread over the other classes."""

    def oracle(images: Images) -> np.ndarray:
        answered = victim.answer(marker, design.margin, images)[0]
        probabilities = victim.view(images)[1]
        order = np.argsort(-probabilities, axis=1, kind="stable")
        top = np.take_along_axis(probabilities, order, axis=1)[:, :3]
        rows = np.full((len(images), CLASSES), 0.0)
        for i, row in enumerate(order[:, :3]):
            classes = [int(answered[i])] + [int(c) for c in row if c != answered[i]]
            rows[i] = max(0.0, 1.0 - float(top[i].sum())) / (CLASSES - 3)
            rows[i, classes[:3]] = top[i]
        return rows.astype(np.float32)

    return oracle


GRID = np.linspace(0.1, 0.9, 17)
CHUNK_PAIRS = 512
Probabilities = Callable[[np.ndarray], npt.NDArray[np.float64]]


def between_classes(
    images: np.ndarray,
    probabilities: Probabilities,
    count: int,
    margin: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The owner's candidates without the key: up to ``count`` unsure points on segments
    between images the model puts in different classes (``(1 - t) a + t b``, ``t`` on a grid).
    Never the key, so the region test stays exact."""
    if len(images) < 2 or count <= 0:
        return images[:0]
    labels = probabilities(images).argmax(axis=1)
    found: list[np.ndarray] = []
    total, tries = 0, 0
    while total < count and tries < 64:
        tries += 1
        a = rng.integers(len(images), size=CHUNK_PAIRS)
        b = rng.integers(len(images), size=CHUNK_PAIRS)
        keep = labels[a] != labels[b]
        a, b = a[keep], b[keep]
        t = GRID.astype(images.dtype)[None, :, *([None] * (images.ndim - 1))]
        points = (1 - t) * images[a][:, None] + t * images[b][:, None]
        points = points.reshape(-1, *images.shape[1:]).astype(images.dtype)
        chosen = points[unsure(probabilities(points), margin)]
        found.append(chosen)
        total += len(chosen)
    return np.concatenate(found)[:count] if found else images[:0]


def augmented(images: Images, seed: int) -> Images:
    """One augmented copy of each image (``bench.attacks.augment``)."""
    rng = np.random.default_rng(seed)
    return np.stack([augment(x, rng) for x in images])


def benign(victim: Victim, data: digits.DigitsData, marker: RegionMarker, design: Design) -> str:
    """Top-1 accuracy lost on clean held-out digits and on 5,000 augmented benign ones."""
    pool = np.concatenate([data.train_x, data.test_x])
    labels = np.concatenate([data.train_y, data.test_y])
    rng = np.random.default_rng(7)
    picked = rng.integers(len(pool), size=5000)
    aug = np.stack([augment(pool[i], rng) if rng.random() < 0.8 else pool[i] for i in picked])
    out = []
    for name, images, truth in (
        ("clean", data.test_x, data.test_y),
        ("augmented", aug, labels[picked]),
    ):
        answered, marked, _ = victim.answer(marker, design.margin, images)
        own = victim.view(images)[1].argmax(1)
        cost = float((own == truth).mean() - (answered == truth).mean())
        out.append(f"{name} {cost:+.2%} ({marked.mean():.1%} marked)")
    return "benign cost: " + ", ".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Run every design under every key at every budget."""
    defaults = WatermarkConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    default = f"{defaults.region_dims},{defaults.region_cell},{defaults.max_margin},{defaults.region_fraction}"
    parser.add_argument("--designs", nargs="+", default=[default])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--keys", type=int, default=1)
    parser.add_argument("--pooled", action="store_true", help="partition channel means")
    parser.add_argument("--adaptive", action="store_true", help="the adaptive thieves instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = digits.load_data()
    victim = Victim(digits.train(data), args.pooled)
    for text in args.designs:
        design = Design.parse(text)
        for k in range(args.keys):
            started = time.perf_counter()
            key = WatermarkKey(bytes([k + 1]) * 32)
            marker = RegionMarker(key, design.fraction, design.dims, design.cell)
            print(f"design {text} (dims,cell,margin,fraction), key {k}:", flush=True)
            print("  " + benign(victim, data, marker, design), flush=True)
            for budget in args.budgets:
                if args.adaptive:
                    adaptive(victim, data, marker, design, budget)
                else:
                    print(diagnose(victim, data, marker, design, budget), flush=True)
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
