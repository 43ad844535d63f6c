"""Shared test settings. Torch gets one intra-op thread per test process: on a shared 2-core
machine the default oversubscribes and turns millisecond kernels into seconds.

HILQ_REQUIRE (a comma list of helpers.CAPABILITIES: pg, ssh, netns, ray, loadgen, chromium)
turns the skips for want of those into failures: `helpers.require` fails at once, and the hook
below fails any other skip whose reason reads `needs NAME: …` (helpers.needs, e.g. in a
`skipif` marker)."""

import re

import pytest
import torch
from helpers import required
from pg_server import database, server


def pytest_configure(config):
    try:
        required()              # a misspelt HILQ_REQUIRE is a usage error, not silence
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.skipped and not hasattr(rep, "wasxfail"):
        why = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        need = re.search(r"\bneeds (\w+): ", why)
        if need and need[1] in required():
            rep.outcome = "failed"
            rep.longrepr = f"HILQ_REQUIRE names {need[1]!r}, so this skip fails: {why}"
    return rep


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pg_admin():
    """One real PostgreSQL server for the whole session (tests/pg_server.py)."""
    with server() as url:
        yield url


@pytest.fixture
def pg_url(pg_admin):
    """A fresh database on that server, dropped after the test."""
    with database(pg_admin) as url:
        yield url


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """One real OpenSSH sshd on 127.0.0.1 for the whole session, with its own host key,
    client key and known_hosts (tests/test_ssh_device.py's `Sshd`); skipped, or failed under
    HILQ_REQUIRE=ssh, where sshd is not installed."""
    from test_ssh_device import Sshd, _need_sshd

    _need_sshd()
    d = Sshd(tmp_path_factory.mktemp("sshd"))
    yield d
    d.kill()
