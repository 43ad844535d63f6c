"""The agent's typed failures and its exit codes (part of the agent bundle: standard library
only). A `Failure` raised anywhere in a run becomes the agent's one JSON line
`{"status": "failed", "failure": KIND, "reason": ...}` and the exit code of its kind."""

from __future__ import annotations

EXIT_CODES = {"ok": 0, "agent_crash": 1, "bad_input": 2, "unsupported": 3,
              "runtime_error": 4, "wrong_answer": 5, "timeout": 6}
FAILURE_OF_EXIT = {v: k for k, v in EXIT_CODES.items()}


class Failure(Exception):
    def __init__(self, kind: str, reason: str, **extra):
        super().__init__(reason)
        self.kind, self.reason, self.extra = kind, reason, extra
