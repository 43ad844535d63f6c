"""SSHDevice against a real OpenSSH sshd this suite starts on 127.0.0.1 (no mocks).

Without /usr/sbin/sshd the tests skip, or fail where HILQ_REQUIRE names `ssh` (`.ci/run`
installs openssh-server: a missing sshd there is a broken build, not a reason to skip).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import quick_protocol, require
from hilq.devices.errors import DeviceError
from hilq.devices.local import LocalDevice
from hilq.devices.ssh import SSHDevice
from onnx_tiny import reference_npz, tiny_artifact

from hilq.measurement import Protocol

pytestmark = pytest.mark.ssh
SSHD = "/usr/sbin/sshd"
QUICK = quick_protocol(warmup_iters=2, min_iters=20, min_duration_s=0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


class Sshd:
    """One sshd -D with its own host key, client key and known_hosts, listening on `addr`
    (a free port of 127.0.0.1 by default; inside network namespace `netns` when given)."""

    def __init__(self, root: Path, addr: str = "127.0.0.1", port: int | None = None,
                 netns: str | None = None, log_level: str = "ERROR"):
        self.root, self.addr, self.port = root, addr, port or _free_port()
        root.mkdir(parents=True, exist_ok=True)
        _keygen(root / "host_key")
        _keygen(root / "client_key")
        shutil.copy(root / "client_key.pub", root / "authorized_keys")
        host_pub = (root / "host_key.pub").read_text().split()
        (root / "known_hosts").write_text(f"[{addr}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress {addr}\nHostKey {root}/host_key\n"
            f"PidFile {root}/sshd.pid\nAuthorizedKeysFile {root}/authorized_keys\n"
            "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"PubkeyAuthentication yes\nSubsystem sftp internal-sftp\nLogLevel {log_level}\n"
            "MaxStartups 100\nMaxSessions 100\n")
        try:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation dir (sshd as root)
        except PermissionError:
            pass
        wrap = ["ip", "netns", "exec", netns] if netns else []   # ip execs sshd: same pid
        self.proc = subprocess.Popen([*wrap, SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(root / "sshd.log", "w"), start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((addr, self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}")

    def connections(self) -> int:
        """TCP connections sshd accepted so far (its log at LogLevel VERBOSE or more)."""
        return (self.root / "sshd.log").read_text().count("Connection from ")

    def device(self, name="edge", **kw) -> SSHDevice:
        cfg = dict(host=self.addr, port=self.port, user=pwd.getpwuid(os.getuid()).pw_name,
                   key_file=str(self.root / "client_key"),
                   known_hosts=str(self.root / "known_hosts"), python=sys.executable,
                   workdir=str(self.root / "remote"), connect_timeout_s=5, retries=2,
                   backoff_s=0.1)
        cfg.update(kw)
        return SSHDevice(name, **cfg)

    def kill(self):
        """Kill sshd and every process under it (its connections), as if the host died."""
        for pid in [*_descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _need_sshd():
    if not os.path.exists(SSHD):
        require("ssh", f"{SSHD} is not installed (apt-get install openssh-server)")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("art"))


def test_deploy_run_collect_and_cleanup(sshd, art, tmp_path):
    ref = reference_npz(art, tmp_path / "ref.npz")
    dev = sshd.device()
    try:
        m = dev.run(art, QUICK, "ort", reference=str(ref))
        assert m.status == "ok", m.reason
        assert m.device == "edge" and m.model == "tiny" and m.variant == "fp32"
        assert m.latency_ms["n"] >= 20 and m.latency_ms["p50"] > 0
        assert m.outputs_check["ok"] and m.artifact_sha256 == art.sha256
        assert m.facts["runtimes"]["ort"]
        remote = sshd.root / "remote"
        assert (remote / "cache" / art.sha256).is_file()
        assert list((remote / "sessions").iterdir()) == []      # session dir removed
        assert not (remote / "lock").exists()                     # lock released
        inode = (remote / "cache" / art.sha256).stat().st_ino
        assert dev.run(art, QUICK, "ort").status == "ok"
        # cache reused, not re-sent: a hit touches the file in place; a miss uploads a new
        # `.part-` file beside it and renames it over, so the entry's inode would change
        assert (remote / "cache" / art.sha256).stat().st_ino == inode
        assert len([p for p in (remote / "cache").iterdir() if "." not in p.name]) == 1
        facts = dev.facts()
        assert facts["kind"] == "ssh" and facts["cpu"]["logical_cores"] >= 1
    finally:
        dev.close()


def test_wrong_answer_is_typed(sshd, art, tmp_path):
    ref = reference_npz(art, tmp_path / "ref.npz", scale=1.5)
    with_dev = sshd.device()
    m = with_dev.run(art, QUICK, "ort", reference=str(ref))
    with_dev.close()
    assert m.status == "failed" and m.failure == "wrong_answer", m.reason


def test_corrupt_cache_entry_is_replaced(sshd, art):
    dev = sshd.device()
    try:
        assert dev.run(art, QUICK).status == "ok"
        (sshd.root / "remote" / "cache" / art.sha256).write_bytes(b"garbage")
        assert dev.run(art, QUICK).status == "ok"
    finally:
        dev.close()


def test_cache_is_size_bounded(sshd, tmp_path):
    arts = [tiny_artifact(tmp_path / str(k), width=128, seed=k) for k in range(3)]
    dev = sshd.device(workdir=str(tmp_path / "remote"), cache_max_mb=0.15)  # ~2 artifacts
    try:
        for k, a in enumerate(arts):
            assert dev.run(a, QUICK).status == "ok"
            if k == 0:  # an upload cut short by a dead run is cleared by the next one
                (tmp_path / "remote" / "cache" / "x.part-dead").write_bytes(b"half")
        assert not (tmp_path / "remote" / "cache" / "x.part-dead").exists()
        kept = {p.name for p in (tmp_path / "remote" / "cache").iterdir() if "." not in p.name}
        assert arts[-1].sha256 in kept and arts[0].sha256 not in kept
    finally:
        dev.close()


def test_unknown_host_key_refused(sshd, tmp_path):
    (tmp_path / "empty").write_text("")
    with pytest.raises(DeviceError) as e:
        sshd.device(known_hosts=str(tmp_path / "empty")).connect()
    assert e.value.kind == "hostkey"


def test_changed_host_key_refused(sshd, tmp_path):
    _keygen(tmp_path / "other")
    pub = (tmp_path / "other.pub").read_text().split()
    (tmp_path / "kh").write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    dev = sshd.device(known_hosts=str(tmp_path / "kh"))
    with pytest.raises(DeviceError) as e:
        dev.connect()
    assert e.value.kind == "hostkey" and "CHANGED" in str(e.value)
    m = dev.run(tiny_artifact(tmp_path), QUICK)  # a run reports it as a typed failure
    assert m.status == "failed" and m.failure == "hostkey"


def test_wrong_key_is_auth_error(sshd, tmp_path):
    _keygen(tmp_path / "stranger")
    with pytest.raises(DeviceError) as e:
        sshd.device(key_file=str(tmp_path / "stranger")).connect()
    assert e.value.kind == "auth"


def test_unreachable_after_retries(tmp_path):
    (tmp_path / "kh").write_text("")
    dev = SSHDevice("gone", host="127.0.0.1", port=_free_port(), user="x", key_file="/nonexistent",
                    known_hosts=str(tmp_path / "kh"), retries=2, backoff_s=0.05, connect_timeout_s=2)
    with pytest.raises(DeviceError) as e:
        dev.connect()
    assert e.value.kind == "unreachable"


def test_names_are_quoted(sshd, art, tmp_path):
    """A workdir with spaces and shell syntax stays one literal path on the device."""
    weird = tmp_path / "a dir; touch pwned $(id)"
    dev = sshd.device(workdir=str(weird))
    try:
        assert dev.run(art, QUICK).status == "ok"
    finally:
        dev.close()
    assert (weird / "cache" / art.sha256).is_file()
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_killed_sshd_mid_run_is_typed_and_next_device_runs(art, tmp_path):
    _need_sshd()
    dying = Sshd(tmp_path / "dying")
    dev = dying.device(command_timeout_s=60)
    slow = Protocol(warmup_iters=2, warmup_s=0.0, min_iters=10, min_duration_s=30, idle_s=0.05)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("m", dev.run(art, slow)))
    t.start()
    deadline = time.monotonic() + 30
    sessions = tmp_path / "dying" / "remote" / "sessions"
    while time.monotonic() < deadline:  # wait until the agent is measuring
        if sessions.is_dir() and any((p / "agent.pid").exists() for p in sessions.iterdir()):
            break
        time.sleep(0.05)
    time.sleep(0.5)
    killed = time.monotonic()
    dying.kill()
    t.join(60)
    assert not t.is_alive()
    m = result["m"]
    assert m.status == "failed" and m.failure in ("unreachable", "timeout"), m.reason
    assert time.monotonic() - killed < 30
    dev.close()
    local = LocalDevice("local-next", workdir=str(tmp_path / "local"))
    assert local.run(art, QUICK).status == "ok"


def test_stale_lock_of_dead_run_is_taken_over(sshd, art):
    """A run that lost its connection leaves the lock behind; the next one takes it over."""
    import json
    import socket as s

    lock = sshd.root / "remote" / "lock"
    lock.mkdir(parents=True)
    (lock / "owner").write_text(json.dumps({"token": "dead", "host": s.gethostname(),
                                            "pid": os.getpid(), "time": 0, "expires": 9e9}))
    dev = sshd.device()
    try:
        assert dev.run(art, QUICK).status == "ok"
    finally:
        dev.close()
    assert not lock.exists()


def test_concurrent_runs_on_one_device_serialize(sshd, art):
    proto = Protocol(warmup_iters=2, warmup_s=0.0, min_iters=10, min_duration_s=0.5, idle_s=0.05)
    results = []

    def one():
        dev = sshd.device()
        try:
            results.append(dev.run(art, proto))
        finally:
            dev.close()

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [m.status for m in results] == ["ok", "ok"], [m.reason for m in results]
    windows = sorted((m.timing["t_start_epoch"], m.timing["t_end_epoch"]) for m in results)
    assert windows[0][1] <= windows[1][0], windows  # timing windows do not overlap


def test_cli_with_inventory_over_ssh(sshd, art, tmp_path):
    import json

    from hilq.bench import cli

    inv = tmp_path / "devices.toml"
    inv.write_text(f'''[devices.edge1]
kind = "ssh"
host = "127.0.0.1"
port = {sshd.port}
user = "{pwd.getpwuid(os.getuid()).pw_name}"
key_file = "{sshd.root / "client_key"}"
known_hosts = "{sshd.root / "known_hosts"}"
python = "{sys.executable}"
workdir = "{tmp_path / "remote"}"
runtimes = ["ort"]
power = "none"
''')
    assert cli.main(["devices", "check", "--inventory", str(inv)]) == 0
    out = tmp_path / "o.json"
    assert cli.main(["bench", "--artifact", art.path, "--device", "edge1", "--inventory",
                     str(inv), "--rounds", "1", "--min-iters", "20", "--min-duration-s", "0.05",
                     "--warmup-s", "0", "--json", str(out)]) == 0
    (m,) = json.loads(out.read_text())["measurements"]
    assert m["device"] == "edge1" and m["status"] == "ok" and m["latency_ms"]["p50"] > 0
