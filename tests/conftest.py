"""Shared test settings. Torch gets one intra-op thread per test process: on a shared 2-core
machine the default oversubscribes and turns millisecond kernels into seconds."""

import pytest
import torch
from pg_server import database, server


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
