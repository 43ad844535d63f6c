"""Small evaluation helpers: top-1 accuracy and agreement between two models' outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs over `x`, in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy as a fraction in 0..1."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if len(y) == 0:
        raise ValueError("top1 needs at least one sample")
    pred = logits(model, x, batch_size).argmax(dim=-1)
    return float((pred == y).float().mean())


@dataclass(frozen=True)
class Agreement:
    """How closely two models' outputs agree on the same inputs."""

    top1: float           # fraction of samples whose argmax agrees
    max_abs_diff: float
    mean_abs_diff: float


def agreement(a_logits: torch.Tensor, b_logits: torch.Tensor) -> Agreement:
    """Top-1 agreement and max/mean absolute difference of two output tensors."""
    if a_logits.shape != b_logits.shape:
        raise ValueError(f"shapes differ: {tuple(a_logits.shape)} vs {tuple(b_logits.shape)}")
    a, b = a_logits.detach().float(), b_logits.detach().float()
    diff = (a - b).abs()
    same = (a.argmax(dim=-1) == b.argmax(dim=-1)).float().mean()
    return Agreement(float(same), float(diff.max()), float(diff.mean()))
