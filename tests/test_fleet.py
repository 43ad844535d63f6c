"""Faults on a fleet of real network hosts (tests/netfleet.py): a silent partition in the
middle of a three-device nightly, an agent on a cut-off host ending itself, and connect
attempts counted by the hosts themselves (a mute host, a changed host key)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import DIGITS_BENCH, QUICK_PROTOCOL, write_nightly_config
from hilq.devices.bundle import DEADLINE_GRACE_S
from hilq.devices.errors import DeviceError
from hilq.devices.ssh import SSHDevice
from netfleet import Fleet, wait_for
from onnx_tiny import tiny_artifact

from hilq.measurement import Protocol

pytestmark = pytest.mark.ssh
ROOT = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    yield f
    f.close()


# three hosts, each measured for at least 4 s a run: long enough to cut a link mid-run
NIGHTLY = {"name": "fleet", "rounds": 2, "inventory": "devices.toml",
           "protocol": {**QUICK_PROTOCOL, "min_duration_s": 4.0, "threads": 1},
           "bench": [{**DIGITS_BENCH, "devices": ["edge0", "edge1", "edge2"]}]}


def _rows(db: Path) -> list[tuple]:
    try:
        with sqlite3.connect(db, timeout=1) as c:
            return c.execute("select device, variant, round, status, failure, p50_ms "
                             "from measurements order by id").fetchall()
    except sqlite3.OperationalError:
        return []


def test_nightly_on_three_hosts_one_cut_mid_measurement(fleet, tmp_path):
    """edge1's link goes down while its agent measures: that device ends `timeout` within
    command_timeout_s plus a margin, edge0 and edge2 complete, the store is intact, and no
    agent is left running on any host."""
    fleet.need_partition()
    cut = fleet.hosts[1]
    fleet.inventory(tmp_path / "devices.toml", command_timeout_s=COMMAND_TIMEOUT_S,
                    connect_timeout_s=3, retries=2)
    write_nightly_config(tmp_path / "n.toml", **NIGHTLY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HILQ_CACHE": os.environ.get(
        "HILQ_CACHE", str(ROOT / ".cache"))}
    db = tmp_path / "results" / "hilq.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "hilq", "nightly", "--config", "n.toml",
                             "--no-report"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: cut.agents(measuring=True), 240), "edge1 never started measuring"
        time.sleep(1.0)                       # inside the timed window (4 s)
        cut.cut()
        t_cut = time.monotonic()
        failed = wait_for(lambda: [r for r in _rows(db) if r[0] == "edge1" and r[3] == "failed"],
                          COMMAND_TIMEOUT_S + 60)
        t_failed = time.monotonic() - t_cut
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cut.heal()
    assert failed, out
    assert failed[0][4] == "timeout", failed
    assert COMMAND_TIMEOUT_S - 5 < t_failed < COMMAND_TIMEOUT_S + 15, t_failed
    assert proc.returncode not in (0, None), out             # a failed device fails the night
    rows = _rows(db)
    for name in ("edge0", "edge2"):
        mine = [r for r in rows if r[0] == name]
        assert len(mine) == 4 and all(r[3] == "ok" and r[5] > 0 for r in mine), mine
    edge1 = [r for r in rows if r[0] == "edge1"]
    assert all(r[4] in ("timeout", "unreachable") for r in edge1 if r[3] == "failed"), edge1
    with sqlite3.connect(db) as c:
        assert c.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert c.execute("select status from runs").fetchall() == [("failed",)]
    assert wait_for(lambda: not any(h.agents() for h in fleet.hosts), DEADLINE_GRACE_S + 5), \
        [h.agents() for h in fleet.hosts]
    print(f"\nedge1 cut mid-measurement: timeout after {t_failed:.1f} s "
          f"(command_timeout_s {COMMAND_TIMEOUT_S}); edge0, edge2: "
          + ", ".join(f"{r[1]}/r{r[2]} {r[5]:.2f} ms" for r in rows if r[0] != "edge1"))


def test_agent_on_a_cut_off_host_ends_itself(fleet, tmp_path):
    """After a partition neither end can see (the router drops everything: both links up),
    the host cannot kill the agent through its pid file, and the device's sshd does not know
    the client has gone; the agent's own deadline (command timeout + DEADLINE_GRACE_S) ends
    it, while the partition still holds."""
    fleet.need_partition()
    host = fleet.hosts[2]
    dev = host.sshd.device("edge2", command_timeout_s=8, connect_timeout_s=2, retries=1)
    long = Protocol(warmup_iters=2, warmup_s=0.0, min_iters=10, min_duration_s=120,
                    max_iters=10**9, max_duration_s=180, idle_s=0.05)   # runs past 8 s
    art = tiny_artifact(tmp_path / "art")
    try:
        out = {}
        t0 = time.monotonic()
        th = threading.Thread(target=lambda: out.setdefault("m", dev.run(art, long)))
        th.start()
        (pid,) = wait_for(lambda: host.agents(measuring=True), 60)
        started = time.monotonic()
        time.sleep(1.0)
        host.drop()
        th.join(60)
        m = out["m"]
        assert m.status == "failed" and m.failure == "timeout", m.reason
        assert time.monotonic() - t0 < 8 + 2 * 2 + 10
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists(),
                        8 + DEADLINE_GRACE_S + 10), "the agent ran on past its deadline"
        ended = time.monotonic() - started
        assert ended > 8 + DEADLINE_GRACE_S - 3, ended   # it ended at its own deadline, not before
    finally:
        host.heal()
        dev.close()


MUTE = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_server((sys.argv[1], int(sys.argv[2])))
    held = []
    while True:
        c, _ = s.accept()
        held.append(c)
        with open(sys.argv[3], "a") as f:
            f.write(f"{time.monotonic()}\\n")
""")


@pytest.mark.parametrize("retries", [1, 3])
def test_mute_host_on_the_fleet_is_tried_exactly_retries_times(fleet, tmp_path, retries):
    """A host that accepts TCP and never sends a banner, inside the host's own namespace:
    the attempts are counted by the host, not by the client."""
    host = fleet.hosts[0]
    log = tmp_path / "accepts"
    wrap = ["ip", "netns", "exec", host.ns] if host.ns else []
    mute = subprocess.Popen([*wrap, sys.executable, "-c", MUTE, host.addr, "2299", str(log)])
    try:
        assert wait_for(lambda: _connects(host.addr, 2299), 10)
        assert wait_for(lambda: log.exists() and log.read_text().strip(), 5)   # the probe, logged
        probe = len(log.read_text().split())
        dev = SSHDevice("mute", host=host.addr, port=2299, user="x", key_file="/nonexistent",
                        known_hosts=str(host.sshd.root / "known_hosts"), retries=retries,
                        backoff_s=0.2, connect_timeout_s=1)
        with pytest.raises(DeviceError) as e:
            dev.connect()
        assert e.value.kind == "unreachable" and "banner" in str(e.value)
        time.sleep(0.3)
        times = [float(x) for x in log.read_text().split()[probe:]]
        assert len(times) == retries, times
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g >= 1 + 0.2 * 2**k - 0.05 for k, g in enumerate(gaps)), gaps  # backoff
    finally:
        mute.kill()
        mute.wait()


def _connects(addr, port) -> bool:
    try:
        socket.create_connection((addr, port), 0.2).close()
        return True
    except OSError:
        return False


def test_changed_host_key_on_the_fleet_is_tried_once(fleet, tmp_path):
    """The host's own sshd log counts the connections: one, then `hostkey`, never retried."""
    host = fleet.hosts[0]
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[{host.addr}]:{host.sshd.port} {kind} {key}\n")
    before = host.sshd.connections()
    dev = host.sshd.device("changed", known_hosts=str(kh), retries=3, backoff_s=0.1)
    with pytest.raises(DeviceError) as e:
        dev.connect()
    assert e.value.kind == "hostkey"
    assert wait_for(lambda: host.sshd.connections() - before >= 1, 5)
    time.sleep(0.5)
    assert host.sshd.connections() - before == 1
