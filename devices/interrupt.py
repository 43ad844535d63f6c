"""Stopping cleanly: Ctrl-C or SIGTERM to hilq must not leave an agent timing on the device.

The CLI's signal handler sets `STOP` (and raises `Interrupted` in the main thread); every
place that waits on an agent — a local subprocess, a remote channel — polls it, kills the
agent's process group (locally, or remotely through its pid file), and raises `Interrupted`
from its own thread too, so nothing half-measured is stored, device locks are released by
their `with` blocks, session folders are removed by their `finally`, and the run is marked
`interrupted` by whoever began it (`--resume` continues it).
"""

from __future__ import annotations

import threading

STOP = threading.Event()
POLL_S = 0.2              # how often a waiting device looks at STOP
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Interrupted(KeyboardInterrupt):
    """The user (SIGINT) or the system (SIGTERM) stopped hilq; `code` is the exit code."""

    def __init__(self, signal_name: str = "SIGINT"):
        super().__init__(signal_name)
        self.signal_name, self.code = signal_name, EXIT_CODES.get(signal_name, 130)


def check() -> None:
    """Raise `Interrupted` in this thread once hilq has been told to stop."""
    if STOP.is_set():
        raise Interrupted(getattr(STOP, "signal_name", "SIGINT"))


def stop(signal_name: str) -> None:
    """Tell every waiting device to kill its agent and give up (the signal handler)."""
    STOP.signal_name = signal_name
    STOP.set()
