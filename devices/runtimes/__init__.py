"""Inference engines the on-device agent can time. One small module per engine.

Each module stands alone: it imports only the standard library, numpy and its own engine
(lazily, inside functions), never hilq, because it is copied to the device with the agent.
Every runtime module exposes the same three functions:

- `version() -> str` — the engine's version; raises ImportError when the engine is absent.
- `precisions() -> dict[str, list[str]]` — layer type (`conv`, `linear`) -> variant precisions
  it runs in integer/low-precision kernels (e.g. `["fp32", "w8a8"]`). Asking for anything
  else is an error, never a silent fallback to float.
- `load(path, protocol: dict) -> Loaded` — compile/open the artifact with the protocol's
  threads and settings.

`Loaded` is the plain record below; the agent times `run` and reads the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NAMES = ("ort", "openvino", "torch", "torch-cuda", "tensorrt")


@dataclass
class Loaded:
    """An artifact ready to run. `run(feeds)` does one inference and returns the outputs as
    numpy arrays; it must not return before the work is done (GPU runtimes synchronise)."""

    run: Callable[[dict], list]
    inputs: list[tuple[str, tuple, str]]          # (name, shape with batch resolved, numpy dtype)
    facts: dict = field(default_factory=dict)     # engine version, providers, settings used
    kernels: Callable[[], dict] | None = None     # -> {"integer": [...], "float": [...]}
    device_timer: Any = None                      # GPU: object with start()/stop() -> ms
    close: Callable[[], None] = lambda: None


def module_name(runtime: str) -> str:
    """Runtime name as spelt in configs (`torch-cuda`) -> module file name (`torch_cuda`)."""
    if runtime not in NAMES:
        raise ValueError(f"unknown runtime {runtime!r} (use {', '.join(NAMES)})")
    return runtime.replace("-", "_")


def manifest_variant(path: str, protocol: dict) -> str:
    """The variant the artifact's manifest claims, else the protocol's; fp32 if neither."""
    import json
    import os

    mpath = path + ".manifest.json"
    if os.path.isfile(mpath):
        with open(mpath) as f:
            v = json.load(f).get("variant")
        if v:
            return v
    return protocol.get("variant") or "fp32"


def check_variant(runtime: str, variant: str, precisions: dict[str, list[str]],
                  mixes: bool = False) -> None:
    """Unsupported precision = an error, never a float run under an integer name. Per-layer
    mixes (`config:...`) pass where the runtime verifies each layer through `kernels()`."""
    if mixes and variant.startswith("config:"):
        return
    supported = sorted({p for ps in precisions.values() for p in ps})
    if variant not in supported:
        raise ValueError(f"{runtime} runtime does not run {variant!r} (supported: "
                         f"{', '.join(supported)}); refusing to fall back to float")
