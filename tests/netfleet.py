"""A test fleet on real network hosts: each host a network namespace of its own, joined to
this one by a veth pair, with its own address and its own sshd. Cutting a host's link
(`ip link set … down` on its side) is a silent partition: no FIN, no RST, packets vanish,
and only timeouts save the client.

Needs root and iproute2 (`ip netns`); where namespaces cannot be made, `Fleet` falls back
to sshds on loopback ports and `need_partition()` skips with the reason (fails where
HILQ_REQUIRE names `netns`: `.ci/run` runs as root and installs iproute2).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

from helpers import require
from test_ssh_device import SSHD, Sshd, _need_sshd

TAG = f"hq{os.getpid() % 10000}"           # names unique to this test process (≤ 15 chars)
NET = 100 + os.getpid() % 100              # 10.NET.i.0/24 for host i


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _steps(steps) -> None:
    for step in steps:
        r = _ip(*step)
        if r.returncode:
            raise RuntimeError(f"ip {' '.join(step)}: {r.stderr.strip()}")


def namespaces_unavailable() -> str | None:
    """Why this process cannot make network namespaces, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if subprocess.run(["sh", "-c", "command -v ip"], capture_output=True).returncode:
        return "iproute2 not installed (apt-get install iproute2)"
    probe = f"{TAG}probe"
    r = _ip("netns", "add", probe)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


class Host:
    """One host: namespace `ns`, address `addr` (port 2222), sshd in it; its link `veth`
    goes to the fleet's router namespace (`router`), where the test cuts it."""

    def __init__(self, root: Path, i: int, router: str | None):
        self.name, self.root, self.router = f"edge{i}", root, router
        self.ns = f"{TAG}n{i}" if router else None
        if router:
            self.veth, inner = f"{TAG}h{i}", f"{TAG}i{i}"
            self.addr = f"10.{NET}.{i}.2"
            _steps([("netns", "add", self.ns),
                    ("link", "add", self.veth, "type", "veth", "peer", "name", inner),
                    ("link", "set", self.veth, "netns", router),
                    ("link", "set", inner, "netns", self.ns),
                    ("-n", router, "addr", "add", f"10.{NET}.{i}.1/24", "dev", self.veth),
                    ("-n", router, "link", "set", self.veth, "up"),
                    ("-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", inner),
                    ("-n", self.ns, "link", "set", inner, "up"),
                    ("-n", self.ns, "link", "set", "lo", "up"),
                    ("-n", self.ns, "route", "add", "default", "via", f"10.{NET}.{i}.1")])
            self.sshd = Sshd(root, addr=self.addr, port=2222, netns=self.ns, log_level="VERBOSE")
        else:
            self.sshd = Sshd(root, log_level="VERBOSE")
            self.addr = self.sshd.addr

    def cut(self):
        """`ip link set … down` on the router's side of this host's link: the hilq host's
        own link stays up and hears nothing (no FIN, no RST); the device loses its carrier."""
        r = _ip("-n", self.router, "link", "set", self.veth, "down")
        assert r.returncode == 0, r.stderr

    def drop(self):
        """A partition neither end can see: both links up, the router silently discards
        every packet to or from this host (blackhole rules)."""
        for rule in (("from", self.addr), ("to", self.addr)):
            r = _ip("-n", self.router, "rule", "add", *rule, "blackhole")
            assert r.returncode == 0, r.stderr

    def heal(self):
        _ip("-n", self.router, "link", "set", self.veth, "up")
        for rule in (("from", self.addr), ("to", self.addr)):
            while _ip("-n", self.router, "rule", "del", *rule, "blackhole").returncode == 0:
                pass

    def agents(self, measuring: bool = False) -> list[int]:
        """Pids of agent processes running in this host's work folder (all namespaces share
        the pid space); `measuring`: only those given an artifact (not --facts)."""
        out, work = [], str(self.root / "remote")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if b"agent.py" in argv and cwd.startswith(work) and \
                    (not measuring or b"--artifact" in argv):
                out.append(int(pid))
        return out

    def inventory(self, **extra) -> str:
        """This host's [devices.NAME] table for devices.toml."""
        s = self.sshd
        cfg = {"kind": "ssh", "host": self.addr, "port": s.port,
               "user": pwd.getpwuid(os.getuid()).pw_name, "key_file": str(s.root / "client_key"),
               "known_hosts": str(s.root / "known_hosts"), "python": sys.executable,
               "workdir": str(s.root / "remote"), "runtimes": ["ort"], "power": "none", **extra}
        body = "\n".join(f"{k} = {_toml(v)}" for k, v in cfg.items())
        return f"[devices.{self.name}]\n{body}\n"

    def close(self):
        self.sshd.kill()
        if self.ns:
            _ip("netns", "del", self.ns)     # takes the veth pair with it


def _toml(v) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


class Fleet:
    """`n` hosts behind one router namespace: this namespace ↔ router ↔ each host, routed
    (10.NET.250.0/24 to the router, 10.NET.i.0/24 to host i)."""

    def __init__(self, root: Path, n: int = 3):
        _need_sshd()
        self.why_not = namespaces_unavailable()
        self.hosts: list[Host] = []
        self.router = f"{TAG}r" if self.why_not is None else None
        try:
            if self.router:
                up, down = f"{TAG}u", f"{TAG}d"
                _steps([("netns", "add", self.router),
                        ("link", "add", up, "type", "veth", "peer", "name", down),
                        ("link", "set", down, "netns", self.router),
                        ("addr", "add", f"10.{NET}.250.1/24", "dev", up),
                        ("link", "set", up, "up"),
                        ("-n", self.router, "addr", "add", f"10.{NET}.250.2/24", "dev", down),
                        ("-n", self.router, "link", "set", down, "up"),
                        ("route", "add", f"10.{NET}.0.0/16", "via", f"10.{NET}.250.2")])
                subprocess.run(["ip", "netns", "exec", self.router, "sysctl", "-qw",
                                "net.ipv4.ip_forward=1"], check=True)
            for i in range(n):
                self.hosts.append(Host(root / f"host{i}", i, self.router))
        except Exception:
            self.close()
            raise

    def need_partition(self):
        if self.why_not:
            require("netns", f"no network namespaces, so no silent partition: {self.why_not} "
                    "(the fleet runs on loopback ports)")

    def inventory(self, path: Path, **extra) -> Path:
        path.write_text("\n".join(h.inventory(**extra) for h in self.hosts))
        return path

    def close(self):
        for h in self.hosts:
            h.close()
        if self.router:
            _ip("netns", "del", self.router)     # and the veth pair to this namespace


def wait_for(cond, timeout: float, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := cond():
            return v
        time.sleep(poll)
    return None


__all__ = ["Fleet", "Host", "SSHD", "namespaces_unavailable", "wait_for"]
