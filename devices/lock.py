"""Device locks, so two runs never share a device (the measurement would be worthless).

Locally a `flock` on a file: the kernel drops it when the holder dies, so it is never stale.
Remotely an atomic `mkdir` of a lock directory holding an `owner` JSON (token, host, pid,
time, expiry). A lock is stale when its expiry passed, when its holder ran on this host and
that process is gone, or when it names this very process but a token this process no longer
holds (a run whose connection died before it could release). A stale lock is taken over by
renaming it away first, an atomic step only one waiter can win.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager

from .errors import DeviceError

HELD: set[str] = set()   # tokens of the remote locks this process holds right now


@contextmanager
def local_lock(path: str, wait_s: float = 3600.0, poll_s: float = 0.05):
    """Exclusive flock on `path` (created if needed); waits up to `wait_s`, then `busy`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise DeviceError("busy", f"device lock {path} still held after {wait_s:.0f} s") from e
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "time": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(owner: dict | None, now: float | None = None) -> bool:
    if owner is None:
        return False
    now = time.time() if now is None else now
    if now > float(owner.get("expires", 0)):
        return True
    if owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", -1))
        if pid == os.getpid():
            return owner.get("token") not in HELD
        return not _alive(pid)
    return False


@contextmanager
def dir_lock(fs, path: str, ttl_s: float, wait_s: float = 3600.0, poll_s: float = 0.2):
    """Hold the lock directory `path` on a file system `fs` (an object with mkdir(path) ->
    bool created, write(path, text), read(path) -> text | None, rename(a, b) -> bool,
    rmtree(path)). `ttl_s` bounds how long a holder may keep it."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    unowned_since = None
    while True:
        if fs.mkdir(path):
            owner = {"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                     "time": time.time(), "expires": time.time() + ttl_s}
            fs.write(f"{path}/owner", json.dumps(owner))
            HELD.add(token)
            break
        text = fs.read(f"{path}/owner")
        owner = json.loads(text) if text else None
        if owner is None:  # being created right now, or its creator died before writing
            unowned_since = unowned_since or time.monotonic()
        stale = is_stale(owner) or (owner is None and time.monotonic() - unowned_since > 10)
        if stale:
            aside = f"{path}.stale-{token}"
            if fs.rename(path, aside):
                fs.rmtree(aside)
            continue
        if time.monotonic() > deadline:
            who = f"{owner.get('host')} pid {owner.get('pid')}" if owner else "unknown"
            raise DeviceError("busy", f"device locked by {who} for more than {wait_s:.0f} s")
        time.sleep(poll_s)
    try:
        yield token
    finally:
        HELD.discard(token)
        try:
            text = fs.read(f"{path}/owner")
            if text and json.loads(text).get("token") == token:
                fs.rmtree(path)
        except Exception:  # noqa: BLE001 — connection gone (any transport's error): the
            pass           # lock is then detected as stale by the next run


class LocalFS:
    """`dir_lock`'s file system on this machine (tests, shared network mounts)."""

    @staticmethod
    def mkdir(path: str) -> bool:
        try:
            os.mkdir(path)
            return True
        except FileExistsError:
            return False

    @staticmethod
    def write(path: str, text: str):
        with open(path, "w") as f:
            f.write(text)

    @staticmethod
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    @staticmethod
    def rename(a: str, b: str) -> bool:
        try:
            os.rename(a, b)
            return True
        except OSError:
            return False

    @staticmethod
    def rmtree(path: str):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
