"""Small model builders with example inputs, for tests, examples and benchmarks."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from prunec.errors import InputError

BUILDERS: dict[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]] = {}


def builder(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        BUILDERS[name] = fn
        return fn
    return wrap


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    """A fresh model (seeded) and its example inputs."""
    if name not in BUILDERS:
        raise InputError(f"models_zoo has no model '{name}'", f"use one of {sorted(BUILDERS)}")
    torch.manual_seed(0)
    model, inputs = BUILDERS[name]()
    return model.eval(), inputs


class ConvBNNet(nn.Module):
    """conv-bn-relu ×3 with a residual add and a linear head (the simplest coupled CNN)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
                                  nn.ReLU(), nn.Conv2d(2 * width, width, 3, padding=1),
                                  nn.BatchNorm2d(width))
        self.head = nn.Linear(width * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        x = nn.functional.adaptive_avg_pool2d(x, 7)
        return self.head(torch.flatten(x, 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@builder("convbn")
def _convbn() -> tuple[nn.Module, tuple[Any, ...]]:
    return ConvBNNet(), (torch.randn(2, 1, 28, 28),)


@builder("mlp")
def _mlp() -> tuple[nn.Module, tuple[Any, ...]]:
    return MLP(), (torch.randn(4, 64),)
