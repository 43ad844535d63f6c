"""A throwaway PostgreSQL server for the store tests: `initdb` into a temporary directory, a
`postgres` listening on 127.0.0.1 on a free port, one fresh database per test, everything
removed afterwards. PostgreSQL refuses to run as root, so under root the server runs as the
`postgres` (or `nobody`) user.

Without psycopg or the server binaries the tests skip, or fail where HILQ_REQUIRE names `pg`
(`.ci/run` installs postgresql: a missing server there is a broken build, not a reason to skip)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from helpers import require, require_import

USER = "hilq"


def bindir() -> Path | None:
    """Debian keeps the server binaries out of PATH, in /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                  key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return next((d for d in reversed(dirs) if (d / "initdb").exists()), None)


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and no unprivileged user to run postgres as")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server() -> Iterator[str]:
    """Start a server; yield the URL of its maintenance database (SQLAlchemy + psycopg 3)."""
    require_import("pg", "psycopg", "psycopg is not installed (pip install 'psycopg[binary]')")
    bins = bindir()
    if bins is None:
        require("pg", "the PostgreSQL server is not installed: no initdb on PATH or in "
                "/usr/lib/postgresql/*/bin (apt-get install postgresql)")
    user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="hilq-pg-"))
    data = root / "data"
    if user:
        os.chown(root, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    as_user = {"user": user} if user else {}
    port = _free_port()
    proc = None
    try:
        subprocess.run([bins / "initdb", "-D", data, "-U", USER, "-A", "trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, **as_user)
        log = open(root / "log", "wb")  # noqa: SIM115 - closed with the server below
        proc = subprocess.Popen(
            [bins / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", root,
             "-F", "-c", "max_connections=50"],
            stdout=log, stderr=subprocess.STDOUT, **as_user)
        url = f"postgresql+psycopg://{USER}@127.0.0.1:{port}/postgres"
        _wait_ready(url, proc, root / "log")
        yield url
    finally:
        if proc is not None:
            proc.terminate()               # SIGTERM: smart shutdown once clients are gone
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 30) -> None:
    import psycopg

    dsn = url.replace("+psycopg", "")
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def database(admin_url: str) -> Iterator[str]:
    """A fresh, empty database on the server; dropped (connections and all) afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = admin_url.replace("+psycopg", "")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
