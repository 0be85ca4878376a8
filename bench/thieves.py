"""Model thieves the project did not write (IBM ART) and adaptive thieves, for the watermark bench.

Every hyperparameter here was fixed before the watermark was tuned and is not changed after
results are seen (issue 14, item 7). ART (``adversarial-robustness-toolbox==1.20.1``) drives
``CopycatCNN`` and ``KnockoffNets`` (random and adaptive) against a victim seen only through an
``Oracle`` (the public API in the bench), each training a thief network of its own:

* training ``ART defaults``: ART's own defaults (``batch_size_fit=1``, ``nb_epochs=10``), Adam
  at lr 1e-3; ``1,500 steps``: batch 64 and as many epochs as give about 1,500 Adam steps;
* labels ``hard`` (argmax of what the API returns) or ``soft`` (the returned top-k scores, the
  rest of the probability spread evenly over the other classes);
* architectures: the victim's CNN, an MLP, a wide CNN and a deeper CNN.

Adaptive thieves (``Copycat``, hard labels, 1,500 steps, the victim's CNN unless said):
``noise-vote`` (5 copies of each input with pixel noise sigma 0.06, majority label; each copy
is a query), ``smoothing`` (label smoothing 0.1), ``early-stop`` (10% of the answers held out,
stop after 3 epochs without gain in agreement), ``confident`` (drops answers whose top score is
below 0.9), ``disagree`` (a weak model trained for 200 steps on the answers drops the labels it
disagrees with, then the thief trains on the rest).

The thief's data: natural held-out digits, then copies with small shifts, noise and contrast
changes (``thief_pool``), drawn with a fixed seed; a budget of ``n`` queries is the pool's first
``n`` rows, so budgets are nested.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from torch import nn

from splitvault.demo.digits import DigitsCNN

Images = npt.NDArray[np.float32]
Probabilities = npt.NDArray[np.float32]
Oracle = Callable[[Images], Probabilities]  # images -> (n, classes) what the API returned
CLASSES = 10
INPUT_SHAPE = (1, 8, 8)
LEARNING_RATE = 1e-3
Attack = Literal["copycat", "knockoff-random", "knockoff-adaptive"]
Adaptive = Literal["none", "noise-vote", "smoothing", "early-stop", "confident", "disagree"]
NOISE_SIGMA, NOISE_COPIES = 0.06, 5
SMOOTHING = 0.1
CONFIDENT = 0.9
WEAK_STEPS = 200
PATIENCE, HOLDOUT = 3, 0.1


@dataclass(frozen=True)
class Training:
    """How a thief trains: ART's fit with this batch size, for epochs or about ``steps``."""

    name: str
    batch_size: int
    epochs: int = 0  # 0: as many as give ``steps``
    steps: int = 0

    def epochs_for(self, count: int) -> int:
        """Epochs for ``count`` training samples."""
        if self.epochs:
            return self.epochs
        return max(1, math.ceil(self.steps / max(1, math.ceil(count / self.batch_size))))


ART_DEFAULTS = Training("ART defaults", batch_size=1, epochs=10)
STEPS_1500 = Training("1,500 steps", batch_size=64, steps=1500)


@dataclass(frozen=True)
class Thief:
    """One thief: the ART attack, its labels, training and network, and any adaptation."""

    attack: Attack
    soft: bool
    training: Training
    architecture: str = "victim CNN"
    adaptive: Adaptive = "none"

    @property
    def name(self) -> str:
        """A short description for tables."""
        labels = "soft" if self.soft else "hard"
        base = f"{self.attack} {labels}, {self.training.name}, {self.architecture}"
        return base if self.adaptive == "none" else f"{self.adaptive}: {base}"


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, CLASSES))


def _wide_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, CLASSES),
    )


def _deep_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, CLASSES),
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "victim CNN": DigitsCNN,
    "MLP": _mlp,
    "wide CNN": _wide_cnn,
    "deep CNN": _deep_cnn,
}

# The default grid (what finishes on two shared cores) and the full grid (--full).
DEFAULT_THIEVES: list[Thief] = [
    Thief("copycat", False, STEPS_1500),
    Thief("copycat", True, STEPS_1500),
    Thief("knockoff-random", False, STEPS_1500, "MLP"),
    Thief("copycat", False, STEPS_1500, adaptive="noise-vote"),
    Thief("copycat", False, STEPS_1500, adaptive="confident"),
]
FULL_THIEVES: list[Thief] = [
    *(
        Thief(attack, soft, training, architecture)
        for attack in ("copycat", "knockoff-random")
        for soft in (False, True)
        for training in (ART_DEFAULTS, STEPS_1500)
        for architecture in ARCHITECTURES
    ),
    Thief("knockoff-adaptive", False, STEPS_1500),
    Thief("knockoff-adaptive", False, ART_DEFAULTS),
    *(
        Thief("copycat", False, STEPS_1500, adaptive=kind)
        for kind in ("noise-vote", "smoothing", "early-stop", "confident", "disagree")
    ),
]


def thief_pool(natural: Images, count: int, seed: int) -> Images:
    """``count`` thief queries: the natural images first, then augmented copies of them."""
    rng = np.random.default_rng(seed)
    rows = [natural[i] for i in rng.permutation(len(natural))][:count]
    while len(rows) < count:
        rows.append(_augment(natural[int(rng.integers(len(natural)))], rng))
    return np.stack(rows).astype(np.float32)


def _augment(image: Images, rng: np.random.Generator) -> Images:
    """A one-pixel shift, light noise and a contrast change of one (1, 8, 8) digit."""
    plane = ndimage.shift(image[0], rng.integers(-1, 2, size=2), order=0, mode="constant")
    plane = plane * rng.uniform(0.7, 1.3) + rng.normal(0.0, 0.03, plane.shape)
    return np.asarray(np.clip(plane, 0.0, 1.0)[None], dtype=np.float32)


def hard(probabilities: Probabilities) -> Probabilities:
    """One-hot of each row's argmax (what a hard-label thief keeps)."""
    one_hot: Probabilities = np.eye(CLASSES, dtype=np.float32)[probabilities.argmax(axis=1)]
    return one_hot


def art_classifier(architecture: str, seed: int) -> Any:
    """A fresh ART ``PyTorchClassifier`` of ``architecture`` (the thief's network)."""
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(seed)
    model = ARCHITECTURES[architecture]()
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=LEARNING_RATE),
        input_shape=INPUT_SHAPE,
        nb_classes=CLASSES,
        clip_values=(0.0, 1.0),
    )


def victim(oracle: Oracle) -> Any:
    """The victim as ART sees it: a black box answering probabilities."""
    from art.estimators.classification import BlackBoxClassifier

    return BlackBoxClassifier(oracle, INPUT_SHAPE, CLASSES, clip_values=(0.0, 1.0))


@dataclass
class Stolen:
    """A trained thief: its network, the queries it sent (the candidates) and their count."""

    model: nn.Module
    queries: Images


def steal(
    thief: Thief, oracle: Oracle, pool: Images, labels: npt.NDArray[np.int64], seed: int
) -> Stolen:
    """Run ``thief`` with ``len(pool)`` queries; ``labels`` are the thief's own labels of
    ``pool`` (KnockoffNets adaptive samples by them)."""
    np.random.seed(seed)  # ART samples with numpy's global generator
    if thief.adaptive != "none":
        return _adaptive(thief, oracle, pool, seed)
    thieved = art_classifier(thief.architecture, seed)
    sent: list[Images] = []

    def recording(images: Images) -> Probabilities:
        sent.append(images)
        answered = oracle(images)
        # KnockoffNets adaptive keeps only the argmax itself but rewards on the scores.
        keep_scores = thief.soft or thief.attack == "knockoff-adaptive"
        return answered if keep_scores else hard(answered)

    training = thief.training
    if thief.attack == "copycat":
        from art.attacks.extraction import CopycatCNN

        attack: Any = CopycatCNN(
            victim(recording),
            batch_size_fit=training.batch_size,
            batch_size_query=64,
            nb_epochs=training.epochs_for(len(pool)),
            nb_stolen=len(pool),
            use_probability=thief.soft,
        )
        stolen = attack.extract(pool, thieved_classifier=thieved)
    else:
        from art.attacks.extraction import KnockoffNets

        strategy = "adaptive" if thief.attack == "knockoff-adaptive" else "random"
        attack = KnockoffNets(
            victim(recording),
            batch_size_fit=training.batch_size,
            batch_size_query=64,
            nb_epochs=training.epochs_for(len(pool)),
            nb_stolen=len(pool),
            sampling_strategy=strategy,
            verbose=False,
            use_probability=thief.soft,
        )
        y = labels if strategy == "adaptive" else None
        stolen = attack.extract(pool, y, thieved_classifier=thieved)
    return Stolen(stolen.model.eval(), np.concatenate(sent))


def _adaptive(thief: Thief, oracle: Oracle, pool: Images, seed: int) -> Stolen:
    """The adaptive thieves: change what is queried or kept, then train as ART's Copycat does."""
    rng = np.random.default_rng(seed)
    if thief.adaptive == "noise-vote":
        inputs = pool[: max(1, len(pool) // NOISE_COPIES)]
        noisy = np.repeat(inputs, NOISE_COPIES, axis=0)
        noisy = np.clip(noisy + rng.normal(0.0, NOISE_SIGMA, noisy.shape), 0, 1).astype(np.float32)
        votes = oracle(noisy).argmax(axis=1).reshape(len(inputs), NOISE_COPIES)
        majority = np.array([np.bincount(row, minlength=CLASSES).argmax() for row in votes])
        return Stolen(_fit(thief, inputs, np.eye(CLASSES, dtype=np.float32)[majority], seed), noisy)
    answered = oracle(pool)
    targets, keep = hard(answered), np.ones(len(pool), dtype=bool)
    if thief.adaptive == "smoothing":
        targets = targets * (1 - SMOOTHING) + SMOOTHING / CLASSES
    elif thief.adaptive == "confident":
        keep = answered.max(axis=1) >= CONFIDENT
    elif thief.adaptive == "disagree":
        weak = _fit(
            Thief("copycat", False, Training("weak", 64, steps=WEAK_STEPS)), pool, targets, seed
        )
        with torch.inference_mode():
            guess = weak(torch.from_numpy(pool)).argmax(dim=1).numpy()
        keep = guess == targets.argmax(axis=1)
    if thief.adaptive == "early-stop":
        return Stolen(_early_stopped(thief, pool, targets, seed), pool)
    return Stolen(_fit(thief, pool[keep], targets[keep], seed), pool)


def _fit(thief: Thief, images: Images, targets: Probabilities, seed: int) -> nn.Module:
    thieved = art_classifier(thief.architecture, seed)
    epochs = thief.training.epochs_for(len(images))
    thieved.fit(
        images, targets, batch_size=thief.training.batch_size, nb_epochs=epochs, verbose=False
    )
    model: nn.Module = thieved.model
    return model.eval()


def _early_stopped(thief: Thief, images: Images, targets: Probabilities, seed: int) -> nn.Module:
    """Epoch by epoch; stops after ``PATIENCE`` epochs without gain on held-out answers."""
    cut = max(1, int(len(images) * (1 - HOLDOUT)))
    thieved = art_classifier(thief.architecture, seed)
    best, best_state, waited = -1.0, None, 0
    for _ in range(thief.training.epochs_for(cut)):
        thieved.fit(
            images[:cut],
            targets[:cut],
            batch_size=thief.training.batch_size,
            nb_epochs=1,
            verbose=False,
        )
        held = thieved.predict(images[cut:]).argmax(axis=1)
        score = float((held == targets[cut:].argmax(axis=1)).mean())
        if score > best:
            best, waited = score, 0
            best_state = {k: v.clone() for k, v in thieved.model.state_dict().items()}
        else:
            waited += 1
            if waited >= PATIENCE:
                break
    model: nn.Module = thieved.model
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()
