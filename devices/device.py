"""What every target shares, whether it is this machine or one reached over SSH: a `Device`.

A structural type (`typing.Protocol`): `LocalDevice` and `SSHDevice` do not inherit from it,
they only have to answer the same calls, and a new transport (a Ray actor, a board on a
serial line) is one more class with these four members. `tests/test_local_device.py` checks
both against it.
"""

from __future__ import annotations

from typing import Protocol as _Structural
from typing import runtime_checkable

from hilq.measurement import Measurement, Protocol


@runtime_checkable
class Device(_Structural):
    name: str        # how the inventory and the store call it
    kind: str        # "local" | "ssh" | ...
    power: str       # the meter it measures energy with ("none" if it has none)

    def facts(self) -> dict:
        """OS, CPU and its flags, GPU, engine versions: stored with every measurement."""

    def run(self, artifact, protocol: Protocol, runtime: str = "ort",
            reference: str | None = None, rtol: float = 1e-3, atol: float = 1e-4,
            evalset=None) -> Measurement:
        """Time `artifact` under `protocol` with `runtime`, then evaluate it over `evalset`
        when given. Typed failures come back as a failed Measurement, never an exception."""

    def close(self) -> None:
        """Let go of connections; safe to call twice."""
