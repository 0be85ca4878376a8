"""Small models for split tests, including one with a nested split point and a skip path."""

from __future__ import annotations

import torch
from torch import nn

from splitvault.packing.spec import ModelSpec


class Block(nn.Module):
    """A residual MLP block: the skip connection crosses any cut made inside it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, width * 2), nn.GELU(), nn.Linear(width * 2, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.mlp(self.norm(x))
        return out


class NestedNet(nn.Module):
    """Token features -> encoder.blocks[0..2] -> mean over tokens -> classifier."""

    def __init__(self, features: int = 12, width: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.encoder = nn.Module()
        self.encoder.blocks = nn.ModuleList([Block(width) for _ in range(3)])
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.encoder.blocks:  # type: ignore[union-attr]
            h = block(h)
        logits: torch.Tensor = self.head(h.mean(dim=1))
        return logits


def nested_factory() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A seeded NestedNet with a (batch, tokens, features) example."""
    torch.manual_seed(7)
    return NestedNet().eval(), {"tokens": torch.randn(3, 6, 12)}


def nested_spec() -> ModelSpec:
    """NestedNet with dynamic batch and token dimensions."""
    module, example = nested_factory()
    return ModelSpec(
        module=module,
        example_inputs=example,
        dynamic_dims={"tokens": {0: "batch", 1: "tokens"}},
        max_sizes={"batch": 64, "tokens": 32},
        labels=[f"class-{i}" for i in range(5)],
    )
