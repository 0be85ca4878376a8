"""The ``mymodels.py`` a new user writes: tests copy this file into a folder of their own and
run ``splitvault pack --factory mymodels:...`` there, and import it here for the originals.

Every factory seeds torch first, so the CLI's process and the test build the same weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10: a split at fc1 keeps 68% of the parameters private, at fc2 5%."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        out: torch.Tensor = self.fc3(torch.relu(self.fc2(h)))
        return out


def make_mlp() -> tuple[nn.Module, torch.Tensor]:
    """An MLP with a batch of 4 as its example."""
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(4, 64)


def make_mlp_one() -> tuple[nn.Module, torch.Tensor]:
    """The same MLP with what most people write as the example: a batch of 1."""
    torch.manual_seed(0)
    return MLP().eval(), torch.zeros(1, 64)


class ConvBlock(nn.Module):
    """Convolution and ReLU."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class CNN(nn.Module):
    """features.stem -> features.body.{0,1} -> features.pool -> head (nested submodules)."""

    def __init__(self) -> None:
        super().__init__()
        body = nn.Sequential(ConvBlock(8, 16), ConvBlock(16, 16))
        stages = OrderedDict(stem=ConvBlock(1, 8), body=body, pool=nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(stages)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(image))
        return out


def make_cnn() -> tuple[nn.Module, torch.Tensor]:
    """A nested CNN on (batch, 1, 12, 12) images."""
    torch.manual_seed(1)
    return CNN().eval(), torch.rand(3, 1, 12, 12)


class TwoInputs(nn.Module):
    """An image and a vector of metadata, fused, then classified."""

    def __init__(self) -> None:
        super().__init__()
        self.image_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
        self.meta_net = nn.Linear(4, 8)
        self.fuse = nn.Linear(4 * 6 * 6 + 8, 32)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 6))

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.image_net(image), torch.relu(self.meta_net(extra))], dim=1)
        out: torch.Tensor = self.head(self.fuse(both))
        return out


def make_two_inputs() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Two inputs given positionally, as ``forward`` takes them."""
    torch.manual_seed(2)
    return TwoInputs().eval(), (torch.rand(2, 3, 8, 8), torch.rand(2, 4))


class WithNorm(nn.Module):
    """Batch norm and dropout: what a model left in training mode gets wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


def make_train_mode() -> tuple[nn.Module, torch.Tensor]:
    """Returned straight from training: still in training mode, with learnt norm statistics."""
    torch.manual_seed(3)
    model = WithNorm()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, 16) * 3 + 1)
    return model, torch.randn(8, 16)


class Branchy(nn.Module):
    """Control flow on a tensor's value, which torch.export cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        out: torch.Tensor = self.fc2(h)
        return out


def make_branchy() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    return Branchy().eval(), torch.randn(4, 64)


class FixedBatch(nn.Module):
    """A reshape that hard-codes the batch size of the example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)).view(4, 32))
        return out


def make_fixed_batch() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(5)
    return FixedBatch().eval(), torch.randn(4, 64)


class WithMeta(nn.Module):
    """A top-level submodule named ``meta``, which torch's ``ep.module()`` cannot rebuild."""

    def __init__(self) -> None:
        super().__init__()
        self.meta = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.meta(x)))
        return out


def make_meta() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(6)
    return WithMeta().eval(), torch.randn(4, 64)


def make_module_only() -> nn.Module:
    """A common slip: the model without an example input."""
    torch.manual_seed(0)
    return MLP().eval()
