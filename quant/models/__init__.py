"""Models hilq knows by name, and the door for any user model.

`load_model(name)` returns a `ModelEntry`: a way to build the `nn.Module` and, when the
model has any, its data. Built-in names are listed in `BUILTIN` (explicitly: nothing is
registered behind the reader's back); anything of the form `package.module:factory` is a
user model whose factory returns an `nn.Module`, and `--data package.module:factory`
returns its `Data` (or a dict with the same keys).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..spec import SpecError


class ModelError(SpecError):
    """Unknown model name, a factory that cannot be imported, or data of the wrong shape."""


@dataclass
class Data:
    """Calibration and evaluation data. `test_y` None = no labels (latency-only models)."""

    calib_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor | None = None
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    name: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], Data]
    input_shape: tuple[int, ...]      # one sample, without the batch dimension
    description: str = ""


def _builtin() -> dict[str, Callable[[], ModelEntry]]:
    from . import convnets, digits, transformer

    return {
        "digits-cnn": digits.entry,
        "resnet18": convnets.resnet18_entry,
        "resnet50": convnets.resnet50_entry,
        "mobilenet_v2": convnets.mobilenet_v2_entry,
        "tiny-transformer": transformer.entry,
    }


BUILTIN = ("digits-cnn", "resnet18", "resnet50", "mobilenet_v2", "tiny-transformer")


def _import_factory(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ModelError(f"expected package.module:factory, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import {spec!r}: {e}") from None


def _as_data(obj, spec: str) -> Data:
    if isinstance(obj, Data):
        return obj
    if isinstance(obj, dict):
        try:
            return Data(**obj)
        except TypeError as e:
            raise ModelError(f"data factory {spec!r} returned a dict with bad keys: {e}") from None
    raise ModelError(f"data factory {spec!r} must return quant.models.Data or a dict")


def load_model(name: str, data: str | None = None) -> ModelEntry:
    """A built-in name or `package.module:factory`; `data` overrides the model's data."""
    builtin = _builtin()
    if name in builtin:
        entry = builtin[name]()
    elif ":" in name:
        factory = _import_factory(name)
        if data is None:
            raise ModelError(f"user model {name!r} needs --data package.module:factory")
        d = _as_data(_import_factory(data)(), data)
        entry = ModelEntry(name, factory, lambda: d, tuple(d.calib_x.shape[1:]))
        return entry
    else:
        raise ModelError(f"unknown model {name!r} (built-in: {', '.join(BUILTIN)}; "
                         "or package.module:factory)")
    if data is not None:
        d = _as_data(_import_factory(data)(), data)
        entry = ModelEntry(entry.name, entry.build, lambda: d, entry.input_shape, entry.description)
    return entry
