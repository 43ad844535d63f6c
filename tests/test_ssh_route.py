"""SSH as OpenSSH users have it (devices/ssh_route.py), against real sshds and a real ssh-agent:
keys from the agent (an encrypted one too) and the default ~/.ssh/id_*, Host aliases of an ssh
config, and a jump host in front of a target this process cannot reach itself (network
namespaces, tests/netfleet.py; skipped without them, failed where HILQ_REQUIRE names netns).

Every test runs under an empty $HOME and without SSH_AUTH_SOCK, so only what it sets up can log
it in.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time

import pytest
from helpers import require
from hilq.devices import inventory, ssh_route
from hilq.devices.errors import DeviceError
from hilq.devices.ssh import SSHDevice
from netfleet import NET, Fleet, namespaces_unavailable
from test_ssh_device import Sshd, _keygen, _need_sshd

pytestmark = pytest.mark.ssh
USER = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """An empty $HOME (no ~/.ssh/config, no default key) and no agent: nothing of the
    machine's own can log a test in."""
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return h


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An sshd on 127.0.0.1 that also accepts `enc`, a key encrypted with passphrase 'secret'."""
    _need_sshd()
    root = tmp_path_factory.mktemp("sshd")
    s = Sshd(root / "srv")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f",
                    str(root / "enc")], check=True)
    with open(s.root / "authorized_keys", "a") as f:
        f.write((root / "enc.pub").read_text())
    s.enc = root / "enc"
    yield s
    s.kill()


class Agent:
    """A real ssh-agent (-D: in the foreground, so this process owns its pid) on `sock`."""

    def __init__(self, root):
        self.root, self.sock = root, str(root / "agent.sock")
        self.proc = subprocess.Popen(["ssh-agent", "-D", "-a", self.sock],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            assert time.monotonic() < deadline and self.proc.poll() is None, "no ssh-agent"
            time.sleep(0.02)

    def add(self, key, passphrase: str = ""):
        """`ssh-add key`, the passphrase typed by an SSH_ASKPASS script (no terminal here)."""
        ask = self.root / "askpass"
        ask.write_text(f"#!/bin/sh\necho '{passphrase}'\n")
        ask.chmod(0o700)
        env = {**os.environ, "SSH_AUTH_SOCK": self.sock, "SSH_ASKPASS": str(ask),
               "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, stdin=subprocess.DEVNULL,
                       check=True, capture_output=True, start_new_session=True, timeout=30)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def agent(tmp_path, monkeypatch):
    a = Agent(tmp_path)
    monkeypatch.setenv("SSH_AUTH_SOCK", a.sock)
    yield a
    a.kill()


def _logs_in(dev: SSHDevice) -> bool:
    """Whether a command runs on the device after connecting (the login worked)."""
    try:
        return dev.connect().exec_command("true")[1].channel.recv_exit_status() == 0
    finally:
        dev.close()


# --- keys: ssh-agent and the default ones ----------------------------------------------------

def test_an_encrypted_key_in_the_agent_logs_in_without_key_file(server, agent):
    agent.add(server.enc, "secret")
    assert _logs_in(server.device(key_file=None))


def test_an_encrypted_key_file_is_used_through_the_agent(server, agent):
    agent.add(server.enc, "secret")
    assert _logs_in(server.device(key_file=str(server.enc)))


def test_an_encrypted_key_file_without_the_agent_is_a_one_line_auth_error(server):
    with pytest.raises(DeviceError) as e:
        server.device(key_file=str(server.enc)).connect()
    msg = str(e.value)
    assert e.value.kind == "auth" and "\n" not in msg, msg
    assert str(server.enc) in msg and "ssh-agent" in msg and "encrypted" in msg


def test_the_default_key_logs_in_and_nothing_to_offer_is_an_auth_error(server, home):
    with pytest.raises(DeviceError) as e:             # no key_file, no agent, no ~/.ssh/id_*
        server.device(key_file=None).connect()
    assert e.value.kind == "auth" and "ssh-agent" in str(e.value)
    os.link(server.root / "client_key", home / ".ssh" / "id_ed25519")
    assert _logs_in(server.device(key_file=None))


def test_the_inventory_needs_key_file_only_when_nothing_else_logs_in(server, home, tmp_path):
    toml = tmp_path / "devices.toml"
    toml.write_text(f'[devices.b]\nkind = "ssh"\nhost = "127.0.0.1"\nport = {server.port}\n')
    with pytest.raises(DeviceError, match="missing required key 'key_file'"):
        inventory.load(toml)
    os.link(server.root / "client_key", home / ".ssh" / "id_ed25519")
    dev = inventory.open_device("b", inventory.load(toml))
    assert dev.user == USER and dev.key_file is None     # the local user, as OpenSSH


# --- ~/.ssh/config ---------------------------------------------------------------------------

def _config(path, **hosts) -> str:
    """An ssh config: one `Host NAME` block per keyword, its options a dict."""
    path.write_text("".join(f"Host {name}\n" + "".join(f"    {k} {v}\n" for k, v in o.items())
                            for name, o in hosts.items()))
    return str(path)


def test_a_config_host_alias_connects(server, tmp_path):
    cfg = _config(tmp_path / "config", board={"HostName": "127.0.0.1", "Port": server.port,
                                              "User": USER,
                                              "IdentityFile": server.root / "client_key"})
    toml = tmp_path / "devices.toml"
    toml.write_text(f'[devices.b]\nkind = "ssh"\nhost = "board"\nssh_config = "{cfg}"\n'
                    f'known_hosts = "{server.root / "known_hosts"}"\n')
    dev = inventory.open_device("b", inventory.load(toml))   # no user, port, key_file
    assert (dev.port, dev.user) == (server.port, USER)
    assert _logs_in(dev)


def test_inventory_values_override_the_config(server, tmp_path):
    cfg = _config(tmp_path / "config", board={"HostName": "127.0.0.1", "Port": 1,
                                              "User": "nobody-here", "IdentityFile": "/nonexistent"})
    assert _logs_in(server.device(host="board", ssh_config=cfg))    # port, user, key_file given


def test_a_missing_ssh_config_named_explicitly_is_a_one_line_error(server, tmp_path):
    gone = tmp_path / "no-such-config"
    with pytest.raises(DeviceError) as e:
        server.device(ssh_config=str(gone))
    assert e.value.kind == "bad_input" and str(gone) in str(e.value) and "\n" not in str(e.value)
    toml = tmp_path / "devices.toml"
    toml.write_text(f'[devices.b]\nkind = "ssh"\nhost = "h"\nkey_file = "k"\n'
                    f'ssh_config = "{gone}"\n')
    with pytest.raises(DeviceError, match="no-such-config not found"):
        inventory.load(toml)


# --- a jump host ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hops(tmp_path_factory):
    """(bastion, target): two hosts in namespaces of their own; the router refuses this
    process's packets to the target, so only the bastion reaches it."""
    _need_sshd()
    if why := namespaces_unavailable():
        require("netns", f"no network namespaces, so no host only a bastion reaches: {why}")
    fleet = Fleet(tmp_path_factory.mktemp("hops"), n=2)
    bastion, target = fleet.hosts
    subprocess.run(["ip", "-n", fleet.router, "rule", "add", "from", f"10.{NET}.250.1",
                    "to", target.addr, "prohibit"], check=True)   # this namespace's address
    yield bastion, target
    fleet.close()


def _known(path, *hosts, changed=None) -> str:
    """A known_hosts at `path` with the lines of `hosts`, the host `changed` with another key."""
    lines = []
    for h in hosts:
        line = (h.root / "known_hosts").read_text()
        if h is changed:
            _keygen(path.parent / f"other-{h.name}")
            pub = (path.parent / f"other-{h.name}.pub").read_text().split()
            line = f"[{h.addr}]:{h.sshd.port} {pub[0]} {pub[1]}\n"
        lines.append(line)
    path.write_text("".join(lines))
    return str(path)


def _via_config(bastion, target, tmp_path, known_hosts, jump="bastion") -> SSHDevice:
    cfg = _config(tmp_path / "config",
                  bastion={"HostName": bastion.addr, "Port": 2222, "User": USER,
                           "IdentityFile": bastion.root / "client_key"},
                  target={"HostName": target.addr, "Port": 2222, "User": USER,
                          "IdentityFile": target.root / "client_key", "ProxyJump": jump})
    return target.sshd.device(host="target", port=None, user=None, key_file=None,
                              ssh_config=cfg, known_hosts=known_hosts)


def test_the_target_is_reached_only_through_the_bastion(hops, tmp_path):
    bastion, target = hops
    with pytest.raises(OSError):                       # not from here
        socket.create_connection((target.addr, 2222), 3).close()
    dev = _via_config(bastion, target, tmp_path, _known(tmp_path / "kh", bastion, target))
    try:
        facts = dev.facts()
    finally:
        dev.close()
    assert facts["route"] == f"{USER}@{target.addr}:2222 via {USER}@{bastion.addr}:2222"
    assert f"Connection from {bastion.addr} " in (target.root / "sshd.log").read_text()
    route = ssh_route.connect(dev.hops, dev.known_hosts, 5, "edge")
    assert all(c.get_transport().is_active() for c in route.clients) and len(route.clients) == 2
    route.close()                                      # the jump is closed with the target
    assert not any(c.get_transport() and c.get_transport().is_active() for c in route.clients)


def test_an_inventory_jump_authenticated_by_the_agent(hops, agent, tmp_path):
    bastion, target = hops
    agent.add(bastion.root / "client_key")             # the bastion's key is in the agent only
    dev = target.sshd.device(jump=f"{USER}@{bastion.addr}:2222",
                             known_hosts=_known(tmp_path / "kh", bastion, target))
    assert _logs_in(dev)


def test_a_chain_of_jumps(hops, tmp_path):
    """ProxyJump `a,b`: the second jump reached through the first (here the bastion twice)."""
    bastion, target = hops
    dev = _via_config(bastion, target, tmp_path, _known(tmp_path / "kh", bastion, target),
                      jump="bastion,bastion")
    route = ssh_route.connect(dev.hops, dev.known_hosts, 5, "edge")
    try:
        assert route.client.exec_command("true")[1].channel.recv_exit_status() == 0
        b = f"{USER}@{bastion.addr}:2222"
        assert str(route) == f"{USER}@{target.addr}:2222 via {b} -> {b}"
    finally:
        route.close()


@pytest.mark.parametrize("who, how", [("bastion", "unknown"), ("bastion", "changed"),
                                      ("target", "unknown"), ("target", "changed")])
def test_host_keys_are_verified_on_every_hop(hops, tmp_path, who, how):
    bastion, target = hops
    bad = bastion if who == "bastion" else target
    kh = _known(tmp_path / "kh", *(h for h in hops if h is not bad or how == "changed"),
                changed=bad if how == "changed" else None)
    with pytest.raises(DeviceError) as e:
        _via_config(bastion, target, tmp_path, kh).connect()
    msg = str(e.value)
    assert e.value.kind == "hostkey" and "\n" not in msg, msg
    assert ("CHANGED" if how == "changed" else "not in known_hosts") in msg, msg
    assert f"{bad.addr}:2222" in msg and ("via bastion: " in msg) == (who == "bastion"), msg


def test_hilq_devices_check_and_bench_reach_a_board_behind_a_bastion(hops, agent, home, tmp_path):
    """The lab as engineers have it: both keys in the ssh-agent, the route in ~/.ssh/config
    (ProxyJump), and an inventory that names only the Host alias. `hilq devices check` and
    `hilq bench` reach the board through the bastion, and the stored device facts say so."""
    import json
    import sys
    from pathlib import Path

    bastion, target = hops
    for h in hops:
        agent.add(h.root / "client_key")
    _config(home / ".ssh" / "config",
            bastion={"HostName": bastion.addr, "Port": 2222, "User": USER},
            board={"HostName": target.addr, "Port": 2222, "User": USER, "ProxyJump": "bastion"})
    inv = tmp_path / "devices.toml"
    inv.write_text(f'[devices.edge]\nkind = "ssh"\nhost = "board"\n'
                   f'known_hosts = "{_known(tmp_path / "kh", bastion, target)}"\n'
                   f'python = "{sys.executable}"\nworkdir = "{target.root / "remote"}"\n')
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}

    def hilq(*args):
        return subprocess.run([sys.executable, "-m", "hilq", *args, "--inventory", str(inv)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    r = hilq("devices", "check", "edge", "--json", "-")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["devices"]
    assert row["facts"]["route"] == f"{USER}@{target.addr}:2222 via {USER}@{bastion.addr}:2222"
    r = hilq("bench", "--model", "digits-cnn", "--variants", "fp32", "--device", "edge",
             "--rounds", "1", "--min-duration-s", "0.05", "--db", str(tmp_path / "s.sqlite"),
             "--json", "-")
    assert r.returncode == 0, r.stderr
    (m,) = json.loads(r.stdout)["measurements"]
    assert m["status"] == "ok" and m["device"] == "edge"
    log = (target.root / "sshd.log").read_text()
    assert f"Connection from {bastion.addr} " in log
