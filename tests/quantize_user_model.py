"""A user model and its data, loaded as `tests.quantize_user_model:build` / `:data` — the
`--model package.module:factory` door that built-in models also go through."""

import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).eval()


def data() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    with torch.no_grad():
        y = build()(x).argmax(1)     # labels the float model gets right: FP32 top-1 is 1.0
    return {"calib_x": x[:32], "test_x": x, "test_y": y, "name": "user-random"}
