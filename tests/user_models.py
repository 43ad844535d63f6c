"""User models for the model-door tests, loaded as `tests.user_models:<factory>`: a small
image CNN with BatchNorm (what ZeroQ needs), and factories that return the wrong thing."""

import torch
from torch import nn


def tiny_cnn() -> nn.Module:
    """3×32×32 → 3 classes; BatchNorm with non-trivial running statistics."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    m.train()
    with torch.no_grad():
        for _ in range(4):
            m(torch.rand(16, 3, 32, 32) * 2 - 1)
    return m.eval()


def not_a_module():
    return {"weights": [1, 2, 3]}
