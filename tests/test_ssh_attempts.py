"""Connect attempts, counted at the TCP level on 127.0.0.1: a host that accepts and never sends
an SSH banner is tried exactly `retries` times, with the backoff between tries, then
`unreachable`; a changed host key (a real sshd behind a counting proxy) is tried exactly once
(`hostkey` is never retried), and so is a refused key (`auth`)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hilq.devices.errors import DeviceError
from hilq.devices.ssh import SSHDevice
from test_ssh_device import _keygen


class Listener:
    """Accepts TCP connections on a free port and records when each arrived. With `forward`
    (a port) it relays each one there; without, it holds it open and says nothing."""

    def __init__(self, forward: int | None = None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.forward, self.accepted, self.held = forward, [], []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            self.held.append(conn)
            if self.forward is not None:
                up = socket.create_connection(("127.0.0.1", self.forward))
                self.held.append(up)
                for a, b in ((conn, up), (up, conn)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        for s in (self.sock, *self.held):
            s.close()


@pytest.fixture
def listener():
    made = []

    def make(forward=None):
        made.append(Listener(forward))
        return made[-1]

    yield make
    for x in made:
        x.close()


@pytest.mark.parametrize("retries", [1, 3])
def test_a_host_without_a_banner_gets_exactly_retries_attempts(listener, tmp_path, retries):
    silent = listener()
    (tmp_path / "kh").write_text("")
    dev = SSHDevice("mute", host="127.0.0.1", port=silent.port, user="x", key_file="/nonexistent",
                    known_hosts=str(tmp_path / "kh"), retries=retries, backoff_s=0.2,
                    connect_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        dev.connect()
    assert e.value.kind == "unreachable" and "banner" in str(e.value)
    time.sleep(0.2)                     # a late extra attempt would show up here
    assert len(silent.accepted) == retries
    gaps = [b - a for a, b in zip(silent.accepted, silent.accepted[1:])]
    for i, gap in enumerate(gaps):      # banner timeout, then backoff_s * 2**i
        assert gap >= 0.5 + 0.2 * 2 ** i - 0.05, gaps
    assert time.monotonic() - t0 < retries * 0.5 + sum(0.2 * 2 ** i for i in range(retries)) + 3


def _through_proxy(server, listener, tmp_path, host_pub, **device) -> tuple[Listener, SSHDevice]:
    """A counting proxy in front of the real sshd `server`, and a device that reaches it through
    the proxy, with `host_pub` (a .pub file) as the host key it knows for the proxy's port."""
    proxy = listener(forward=server.port)
    pub = host_pub.read_text().split()
    (tmp_path / "kh").write_text(f"[127.0.0.1]:{proxy.port} {pub[0]} {pub[1]}\n")
    return proxy, server.device(port=proxy.port, known_hosts=str(tmp_path / "kh"), **device)


def _assert_tried_once(proxy, dev, kind: str):
    with pytest.raises(DeviceError) as e:
        dev.connect()
    assert e.value.kind == kind
    time.sleep(0.3)
    assert len(proxy.accepted) == 1


def test_a_changed_host_key_is_tried_once(sshd, listener, tmp_path):  # noqa: F811
    _keygen(tmp_path / "other")
    proxy, dev = _through_proxy(sshd, listener, tmp_path, tmp_path / "other.pub", retries=3)
    _assert_tried_once(proxy, dev, "hostkey")


def test_a_refused_key_is_tried_once(sshd, listener, tmp_path):  # noqa: F811
    _keygen(tmp_path / "stranger")
    proxy, dev = _through_proxy(sshd, listener, tmp_path, sshd.root / "host_key.pub",
                                key_file=str(tmp_path / "stranger"), retries=3)
    _assert_tried_once(proxy, dev, "auth")


def test_the_counting_proxy_reaches_the_real_sshd(sshd, listener, tmp_path):  # noqa: F811
    """The proxy is transparent: with the right key and host key a connection succeeds."""
    proxy, dev = _through_proxy(sshd, listener, tmp_path, sshd.root / "host_key.pub")
    try:
        dev.connect()
    finally:
        dev.close()
    assert len(proxy.accepted) == 1
