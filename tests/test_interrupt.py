"""Ctrl-C (SIGINT) or SIGTERM to `hilq nightly` while an agent is timing, on the local device
and over a real sshd: two seconds later no agent process is left, the device lock is free,
what was measured is stored, the run says `interrupted`, hilq exits 130 / 143, and
`--resume` completes the run (devices/interrupt.py)."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DIGITS_BENCH, agent_pids, write_nightly_config
from hilq.bench.store import open_store

pytestmark = pytest.mark.slow

CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _inventory(tmp_path: Path, where: str, sshd=None) -> tuple[Path, Path]:
    work = tmp_path / "device"
    if where == "local":
        text = f'[devices.here]\nkind = "local"\nworkdir = "{work}"\n'
    else:
        text = (f'[devices.here]\nkind = "ssh"\nhost = "{sshd.addr}"\nport = {sshd.port}\n'
                f'user = "{pwd.getpwuid(os.getuid()).pw_name}"\n'
                f'key_file = "{sshd.root / "client_key"}"\n'
                f'known_hosts = "{sshd.root / "known_hosts"}"\n'
                f'python = "{sys.executable}"\nworkdir = "{work}"\n')
    inv = tmp_path / "devices.toml"
    inv.write_text(text)
    return inv, work


def _nightly(tmp_path: Path, inv: Path, *extra) -> subprocess.Popen:
    cfg = write_nightly_config(
        tmp_path / "night.toml", name="interrupt", rounds=1, inventory=str(inv),
        db=str(tmp_path / "s.sqlite"), reports=str(tmp_path / "reports"),
        protocol={"warmup_iters": 3, "warmup_s": 0.0, "min_iters": 10, "min_duration_s": 10.0,
                  "idle_s": 0.05, "threads": 1},
        bench=[{**DIGITS_BENCH, "devices": ["here"], "accuracy": False}])
    return subprocess.Popen([sys.executable, "-m", "hilq", "nightly", "--config", str(cfg),
                             "--no-report", *extra], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _interrupt_then_resume(tmp_path: Path, inv: Path, work: Path, sig) -> tuple[str, str]:
    """(the run's status after the signal, after --resume), every step checked."""
    proc = _nightly(tmp_path, inv)
    deadline = time.monotonic() + 180            # the artifacts are built first
    while not agent_pids(work, timing=True):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)                              # mid-window: the agent is timing
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == CODES[sig], out + err
    assert f"interrupted ({sig.name})" in err, err
    time.sleep(2)
    assert agent_pids(work) == [], "an agent outlived hilq"
    with open_store(tmp_path / "s.sqlite") as store:
        (run,) = store.rows("runs")
        assert run["status"] == "interrupted"
        before = store.rows("measurements", run["id"])
    assert not (work / "lock").exists()                      # the SSH device's lock
    if (work / "locks").is_dir():                            # the local device's flock
        from hilq.devices.lock import local_lock

        with local_lock(str(work / "locks" / "here.lock"), wait_s=0):
            pass
    left = [*work.glob("session-*"), *work.glob("sessions/*")]   # local / SSH sessions
    assert not left, left
    resumed = _nightly(tmp_path, inv, "--resume", run["id"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out + err
    with open_store(tmp_path / "s.sqlite") as store:
        resumed_status = store.run(run["id"])["status"]
        after = store.rows("measurements", run["id"])
    keys = [(m["variant"], m["round"]) for m in after]
    assert sorted(set(keys)) == [("fp32", 0), ("w8a8", 0)] and len(keys) == 2   # no duplicate
    assert {m["id"] for m in before} <= {m["id"] for m in after}     # nothing stored was lost
    return run["status"], resumed_status


# Each signal once and each transport once (one handler serves both signals; each transport
# has its own way to kill the agent): Ctrl-C at a local night, a CI job's SIGTERM at a remote one.

def test_sigint_to_a_local_night_kills_its_agent_and_resumes(tmp_path):
    inv, work = _inventory(tmp_path, "local")
    assert _interrupt_then_resume(tmp_path, inv, work, signal.SIGINT) == ("interrupted", "ok")


def test_sigterm_to_a_night_over_ssh_kills_the_remote_agent_and_resumes(tmp_path, sshd):
    inv, work = _inventory(tmp_path, "ssh", sshd)
    assert _interrupt_then_resume(tmp_path, inv, work, signal.SIGTERM) == ("interrupted", "ok")
