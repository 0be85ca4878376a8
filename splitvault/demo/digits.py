"""A small CNN trained in seconds on scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from torch import nn

from splitvault.packing.spec import ModelSpec

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT = "features.1"


class DigitsCNN(nn.Module):
    """Two conv layers and a two-layer classifier for 1x8x8 images scaled to [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class DigitsData:
    """Train and test split of the digits, images as float32 (N, 1, 8, 8) in [0, 1]."""

    train_x: npt.NDArray[np.float32]
    train_y: npt.NDArray[np.int64]
    test_x: npt.NDArray[np.float32]
    test_y: npt.NDArray[np.int64]


def load_data(seed: int = 0) -> DigitsData:
    """Load scikit-learn's bundled digits and split 75/25 with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(len(order) * 0.75)
    train, test = order[:cut], order[cut:]
    return DigitsData(images[train], labels[train], images[test], labels[test])


def train(data: DigitsData, epochs: int = 15, seed: int = 0) -> DigitsCNN:
    """Train the CNN with Adam; about two seconds on two cores."""
    return fit(torch.from_numpy(data.train_x), torch.from_numpy(data.train_y), epochs, seed)


def fit(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> DigitsCNN:
    """Train a fresh CNN on ``x`` with Adam; ``y`` holds class indices or class probabilities."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):  # type: ignore[no-untyped-call]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return model.eval()


def accuracy(model: nn.Module, data: DigitsData) -> float:
    """Top-1 accuracy on the test split."""
    with torch.inference_mode():
        predicted = model(torch.from_numpy(data.test_x)).argmax(dim=1).numpy()
    return float((predicted == data.test_y).mean())


def spec_for(model: nn.Module, data: DigitsData) -> ModelSpec:
    """The pack spec of a trained digits CNN; the training images are the reference profile, and
    with four augmented copies of each, the watermark key's benign data."""
    benign_x = augmented_copies(data.train_x, BENIGN_COPIES)
    return ModelSpec(
        module=model,
        example_inputs={"image": torch.from_numpy(data.test_x[:4])},
        task="classification",
        labels=LABELS,
        max_sizes={"batch": 1024},
        reference_inputs={"image": torch.from_numpy(data.train_x)},
        benign_inputs={"image": torch.from_numpy(benign_x)},
        benign_labels=torch.from_numpy(np.tile(data.train_y, 1 + BENIGN_COPIES)),
    )


BENIGN_COPIES = 4  # augmented copies of each training image in the watermark's benign data


def augment(image: npt.NDArray[np.float32], rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """One random augmentation of one (1, 8, 8) digit: shift, rotation or noise (the benign
    set of ``bench/watermark_*.py`` and the watermark key's benign data at pack)."""
    plane = image[0]
    kind = rng.integers(3)
    if kind == 0:
        plane = ndimage.shift(plane, rng.integers(-1, 2, size=2), order=0, mode="constant")
    elif kind == 1:
        plane = ndimage.rotate(plane, rng.uniform(-15, 15), reshape=False, order=1)
    else:
        plane = plane + rng.normal(0.0, 0.05, plane.shape)
    return np.asarray(np.clip(plane, 0.0, 1.0)[None], dtype=np.float32)


def augmented_copies(
    images: npt.NDArray[np.float32], copies: int, seed: int = 11
) -> npt.NDArray[np.float32]:
    """``images`` followed by ``copies`` augmented copies of each (``augment``)."""
    rng = np.random.default_rng(seed)
    extra = [np.stack([augment(x, rng) for x in images]) for _ in range(copies)]
    return np.concatenate([images, *extra])


def factory() -> ModelSpec:
    """``splitvault pack --factory splitvault.demo.digits:factory``: train, then pack."""
    data = load_data()
    return spec_for(train(data), data)
