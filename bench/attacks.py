"""Model-extraction attackers and benign clients for ``bench/extraction_monitor.py``.

Every client is driven in simulated time: ``next_batch`` gives the next request (its time and
images, or ``None`` when the client is done) and ``receive`` hands it the answer. Attackers
keep what they learn and can train a copy of the model at any moment (``copy_fidelity``).

* ``JacobianAttacker``: Papernot et al.'s Jacobian-based dataset augmentation. From a few seed
  images it trains a substitute on the answers, then queries ``x + step * sign(grad)`` of the
  substitute's score for the label the oracle gave, round after round.
* ``PerturbationAttacker``: random perturbations around a few seeds.
* ``NaturalAttacker`` (Knockoff-style): held-out natural digits and augmented copies of them
  (one-pixel shifts, small rotations, light noise).
* ``BenignClient``: natural test digits, its own class focus, repeats and pacing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from splitvault.demo.digits import augment as augment  # re-exported: the benchmarks use it
from splitvault.demo.digits import fit

Images = npt.NDArray[np.float32]  # (n, 1, 8, 8) in [0, 1]
Labels = npt.NDArray[np.int64]
HOUR, DAY = 3600.0, 86400.0
FOCUS = ("uniform", "few", "skewed")


@dataclass(frozen=True)
class Answer:
    """What the API returned for a batch: top-1 labels and, with top-k, indices and scores."""

    labels: Labels  # (n,)
    indices: Labels | None = None  # (n, k)
    scores: npt.NDArray[np.float32] | None = None  # (n, k)


Oracle = Callable[[Images], Answer]


@dataclass(frozen=True)
class Batch:
    """One request: when it is sent and what it holds."""

    at: float
    images: Images


@dataclass
class Transcript:
    """Everything a client sent and was answered."""

    images: list[Images] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    @property
    def queries(self) -> int:
        return sum(len(batch) for batch in self.images)

    def add(self, images: Images, answer: Answer) -> None:
        self.images.append(images)
        self.answers.append(answer)

    def soft_targets(self, classes: int = 10) -> tuple[Images, npt.NDArray[np.float32]]:
        """All images and a probability target per image (top-k scores renormalised)."""
        targets = []
        for answer in self.answers:
            target = np.zeros((len(answer.labels), classes), np.float32)
            if answer.indices is not None and answer.scores is not None:
                scores = np.nan_to_num(answer.scores.astype(np.float32))
                np.put_along_axis(target, answer.indices, scores, axis=1)
                sums = target.sum(axis=1, keepdims=True)
                target = np.where(sums > 0, target / np.maximum(sums, 1e-9), target)
            missing = target.sum(axis=1) == 0
            target[missing, answer.labels[missing]] = 1.0
            targets.append(target)
        return np.concatenate(self.images), np.concatenate(targets)


def train_copy(
    transcript: Transcript, *, epochs: int = 30, min_updates: int = 600, seed: int = 0
) -> nn.Module:
    """Train a substitute (the same small CNN, the attacker's best guess) on the answers.

    At least ``epochs`` passes and ``min_updates`` optimiser steps (small sets need many).
    """
    images, targets = transcript.soft_targets()
    x, y = torch.from_numpy(images), torch.from_numpy(targets)
    steps = max(epochs, math.ceil(min_updates / max(1, math.ceil(len(x) / 64))))
    return fit(x, y, steps, seed)


def agreement(copy: nn.Module, oracle_labels: Labels, images: Images) -> float:
    """Share of ``images`` on which the copy's top-1 equals the oracle's."""
    with torch.inference_mode():
        predicted = copy(torch.from_numpy(images)).argmax(dim=1).numpy()
    return float((predicted == oracle_labels).mean())


@dataclass(frozen=True)
class Pacing:
    """An attacker's budget and pace: ``batch`` images every ``interval`` s from ``start``."""

    budget: int = 3000
    batch: int = 20
    interval: float = 2.0
    start: float = 0.0
    seed: int = 0


class Attacker:
    """Common pacing and bookkeeping of the attackers."""

    kind = "attacker"
    name = "attacker"

    def __init__(self, pacing: Pacing) -> None:
        self.budget, self.batch, self.interval = pacing.budget, pacing.batch, pacing.interval
        self.time = pacing.start
        self.rng = np.random.default_rng(pacing.seed)
        self.transcript = Transcript()

    def next_batch(self) -> Batch | None:
        """The next request, or None once the budget is spent."""
        size = min(self.batch, self.budget - self.transcript.queries)
        if size <= 0:
            return None
        images = self.craft(size)
        if len(images) == 0:
            return None
        self.time += self.interval
        return Batch(self.time, images)

    def receive(self, batch: Batch, answer: Answer) -> None:
        """Keep the answer."""
        self.transcript.add(batch.images, answer)

    def craft(self, size: int) -> Images:
        """The next ``size`` (or fewer) images to send."""
        raise NotImplementedError

    def copy_fidelity(self, oracle_labels: Labels, images: Images) -> float:
        """Agreement with the oracle of a copy trained on everything answered so far."""
        return agreement(train_copy(self.transcript), oracle_labels, images)


class JacobianAttacker(Attacker):
    """Jacobian-based dataset augmentation (Papernot et al., 2017) from a few seeds.

    Round 0 queries the seeds. Each later round trains the substitute on all answers so far and
    queries ``clip(x + step * sign(d F_y(x) / dx))`` for (a sample of at most ``round_cap`` of)
    the points queried so far, ``y`` being the oracle's label; ``step`` flips sign every
    ``period`` rounds, as in the paper.
    """

    name = "synthetic (JbDA)"

    def __init__(
        self,
        seeds: Images,
        pacing: Pacing,
        *,
        step: float = 0.1,
        period: int = 3,
        round_cap: int = 400,
        substitute_updates: int = 600,
    ) -> None:
        super().__init__(pacing)
        self.step, self.period, self.round_cap = step, period, round_cap
        self.substitute_updates = substitute_updates
        self.pending: list[Images] = [seeds]
        self.round = 0

    def craft(self, size: int) -> Images:
        if not self.pending:
            self.pending = [self._augment()]
        queue = np.concatenate(self.pending)
        self.pending = [queue[size:]] if len(queue) > size else []
        return queue[:size]

    def _augment(self) -> Images:
        self.round += 1
        images, targets = self.transcript.soft_targets()
        substitute = train_copy(
            self.transcript, epochs=10, min_updates=self.substitute_updates, seed=self.round
        )
        if len(images) > self.round_cap:
            chosen = self.rng.choice(len(images), self.round_cap, replace=False)
            images, targets = images[chosen], targets[chosen]
        x = torch.from_numpy(images).requires_grad_(True)
        labels = torch.from_numpy(targets.argmax(axis=1))
        scores = substitute(x).gather(1, labels[:, None]).sum()
        scores.backward()
        sign = -1.0 if (self.round // self.period) % 2 else 1.0
        gradient = x.grad
        if gradient is None:
            raise RuntimeError("the substitute gave no gradient")
        moved = images + sign * self.step * np.sign(gradient.numpy())
        return np.asarray(np.clip(moved, 0.0, 1.0), dtype=np.float32)


class PerturbationAttacker(Attacker):
    """Random perturbations (uniform in +-``radius`` per pixel) around a few seeds."""

    name = "synthetic (perturbation)"

    def __init__(self, seeds: Images, pacing: Pacing, *, radius: float = 0.25) -> None:
        super().__init__(pacing)
        self.seeds, self.radius, self.sent_seeds = seeds, radius, False

    def craft(self, size: int) -> Images:
        if not self.sent_seeds:
            self.sent_seeds = True
            return self.seeds[:size]
        base = self.seeds[self.rng.integers(len(self.seeds), size=size)]
        noise = self.rng.uniform(-self.radius, self.radius, base.shape)
        return np.asarray(np.clip(base + noise, 0.0, 1.0), dtype=np.float32)


class NaturalAttacker(Attacker):
    """Knockoff-style: held-out natural digits, and augmented copies with ``augment_p``."""

    name = "natural (held-out + augmented)"

    def __init__(self, pool: Images, pacing: Pacing, *, augment_p: float = 0.6) -> None:
        super().__init__(pacing)
        self.pool, self.augment_p = pool, augment_p

    def craft(self, size: int) -> Images:
        picked = self.pool[self.rng.integers(len(self.pool), size=size)]
        return np.stack(
            [
                augment(image, self.rng) if self.rng.random() < self.augment_p else image
                for image in picked
            ]
        )


class BenignClient:
    """A user with its own class focus, volume, repeats and pace, sending natural digits."""

    kind = "benign"

    def __init__(
        self,
        name: str,
        pool: Images,
        pool_labels: Labels,
        *,
        volume: int,
        class_weights: npt.NDArray[np.float64],
        repeat_p: float,
        mean_gap: float,
        max_batch: int,
        start: float,
        seed: int,
    ) -> None:
        self.name, self.volume, self.repeat_p = name, volume, repeat_p
        self.mean_gap, self.max_batch = mean_gap, max_batch
        self.by_class = [np.flatnonzero(pool_labels == c) for c in range(10)]
        self.pool, self.weights = pool, class_weights / class_weights.sum()
        self.time, self.rng = start, np.random.default_rng(seed)
        self.sent: list[Images] = []
        self.transcript = Transcript()

    def next_batch(self) -> Batch | None:
        """The next request, or None once the client's volume is sent."""
        left = self.volume - self.transcript.queries
        if left <= 0:
            return None
        size = min(left, int(self.rng.integers(1, self.max_batch + 1)))
        images = np.stack([self._one() for _ in range(size)])
        self.time += float(self.rng.exponential(self.mean_gap))
        if self.rng.random() < 0.05:  # an occasional long pause between sessions
            self.time += float(self.rng.exponential(12 * HOUR))
        return Batch(self.time, images)

    def receive(self, batch: Batch, answer: Answer) -> None:
        """Keep the answer."""
        self.transcript.add(batch.images, answer)

    def _one(self) -> Images:
        if self.sent and self.rng.random() < self.repeat_p:
            return self.sent[int(self.rng.integers(len(self.sent)))]
        digit = self.rng.choice(10, p=self.weights)
        image = np.asarray(self.pool[int(self.rng.choice(self.by_class[digit]))])
        self.sent.append(image)
        return image


def benign_clients(
    count: int, pool: Images, pool_labels: Labels, *, seed: int, span: float = 14 * DAY
) -> list[BenignClient]:
    """``count`` varied users over ``span`` seconds.

    Volume is log-uniform in 5..400 queries, except that the first tenth send the most, 400.
    Class focus: uniform, one to three classes, or skewed (Dirichlet 0.3). A sixth are batch jobs (up to 32 images per request,
    seconds apart); the others send one to three images at a time, minutes to hours apart.
    Repeats: 0-30% of queries re-send an earlier image.
    """
    rng = np.random.default_rng(seed)
    clients = []
    for i in range(count):
        heavy = i < max(1, count // 10)
        volume = 400 if heavy else round(math.exp(rng.uniform(math.log(5), math.log(400))))
        focus = FOCUS[i % 3] if heavy else str(rng.choice(FOCUS))
        if focus == "uniform":
            weights = np.ones(10)
        elif focus == "few":
            weights = np.zeros(10)
            weights[rng.choice(10, int(rng.integers(1, 4)), replace=False)] = 1.0
        else:
            weights = rng.dirichlet(np.full(10, 0.3)) + 1e-6
        bulk = rng.random() < 1 / 6
        active = rng.uniform(HOUR, span / 2)
        clients.append(
            BenignClient(
                f"benign-{i:03d}",
                pool,
                pool_labels,
                volume=volume,
                class_weights=weights,
                repeat_p=float(rng.uniform(0.0, 0.3)),
                mean_gap=float(rng.uniform(2, 20)) if bulk else active / volume,
                max_batch=32 if bulk else 3,
                start=float(rng.uniform(0, span / 2)),
                seed=int(rng.integers(2**31)),
            )
        )
    return clients
