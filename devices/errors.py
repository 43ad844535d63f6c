"""Typed device failures. `kind` is one of `hilq.measurement.FAILURES`, so a failure is
stored like any other result and the CLI can print it as one line."""

from __future__ import annotations


class DeviceError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
