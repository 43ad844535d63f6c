"""This machine as a device. The agent bundle is copied into a per-run temp dir and run in a
fresh subprocess, exactly as on a remote device, so the local path tests the remote one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hilq.measurement import Measurement, Protocol

from . import bundle, interrupt
from .errors import DeviceError
from .interrupt import POLL_S
from .lock import local_lock


def _default_workdir() -> str:
    return os.path.join(tempfile.gettempdir(), "hilq")


class LocalDevice:
    kind = "local"

    def __init__(self, name: str = "local", python: str | None = None,
                 workdir: str | None = None, runtimes=("ort",), power: str = "none",
                 command_timeout_s: float | None = None, lock_wait_s: float = 3600.0):
        self.name, self.python = name, python or sys.executable
        self.workdir = os.path.expanduser(workdir or _default_workdir())
        self.runtimes, self.power = tuple(runtimes), power
        self.command_timeout_s, self.lock_wait_s = command_timeout_s, lock_wait_s

    def _lock(self):
        return local_lock(os.path.join(self.workdir, "locks", f"{self.name}.lock"),
                          self.lock_wait_s)

    def _agent(self, args: list[str], timeout: float,
               extra: dict[str, str] | None = None) -> tuple[int | None, str, str]:
        """Copy the bundle (and `extra` files: name -> text) into a temp dir, run the agent
        there, remove the dir in `finally`."""
        os.makedirs(self.workdir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="session-", dir=self.workdir)
        try:
            for src, rel in bundle.files():
                dst = Path(tmp, rel)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            for rel, text in (extra or {}).items():
                Path(tmp, rel).write_text(text)
            proc = subprocess.Popen([self.python, *args], cwd=tmp, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            return self._wait(proc, timeout)
        except OSError as e:
            raise DeviceError("agent_crash", f"cannot start {self.python}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _wait(self, proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
        """The agent's (exit code, stdout, stderr). Past `timeout`, or when hilq is told to
        stop (`interrupt.STOP`, Ctrl-C, SIGTERM), its process group is killed: the agent and
        any meter it started."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=POLL_S)
                    return proc.returncode, out, err
                except subprocess.TimeoutExpired:
                    interrupt.check()
                    if time.monotonic() > deadline:
                        _kill_group(proc)
                        raise DeviceError("timeout", f"agent ran past {timeout:.0f} s on "
                                                     f"{self.name}") from None
        except BaseException:        # interrupted here or in the main thread: no orphan
            _kill_group(proc)
            raise

    def facts(self) -> dict:
        rc, out, err = self._agent(["agent.py", "--facts", "--runtimes", ",".join(self.runtimes)], 60)
        try:
            return {"device": self.name, "kind": self.kind, **json.loads(out)}
        except ValueError as e:
            raise DeviceError("agent_crash", f"agent --facts failed (exit {rc}): {err.strip()[-300:]}") from e

    def run(self, artifact, protocol: Protocol, runtime: str = "ort", reference: str | None = None,
            rtol: float = 1e-3, atol: float = 1e-4, evalset=None) -> Measurement:
        """Time `artifact` (a quant.artifact.Artifact) here, then evaluate it over `evalset`
        (an Artifact too) when given; typed failures come back as a failed Measurement,
        never as an exception."""
        ident, protocol, timeout = bundle.prepare(artifact, self.name, runtime, protocol,
                                                  self.power, self.command_timeout_s)
        try:
            with self._lock():
                args = bundle.agent_args(os.path.abspath(artifact.path), "protocol.json", runtime,
                                         reference and os.path.abspath(reference), rtol, atol,
                                         evalset and os.path.abspath(evalset.path), timeout)
                rc, out, err = self._agent(args, timeout,
                                           {"protocol.json": json.dumps(protocol.to_dict())})
        except DeviceError as e:
            return Measurement.failed(**ident, failure=e.kind, reason=str(e),
                                      protocol=protocol.to_dict())
        return bundle.to_measurement(rc, out, err, protocol=protocol, **ident)

    def close(self):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
