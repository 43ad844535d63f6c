"""Where the store lives and how it is written: URLs, engines, transactions, idempotent inserts.

A plain path is SQLite (WAL, foreign keys, BEGIN IMMEDIATE for writers, so two writers wait
for each other instead of failing half-way); `postgresql://` gets the psycopg 3 driver. Write
transactions are per thread and nest: a call inside `with transaction():` joins it.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

DEFAULT_PATH = Path("results") / "hilq.sqlite"


class StoreError(Exception):
    """The database cannot be used as a hilq store (newer schema, bad run id, ...)."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(obj) -> str | None:
    """Canonical JSON (sorted keys) so that equal content hashes and compares equal."""
    if obj is None:
        return None
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return json.dumps(obj, sort_keys=True, default=str)


# Columns that hold JSON text, in any table; `decode` turns them back into values.
JSON_COLUMNS = {"latency", "samples_ms", "device_latency", "power", "kernels", "protocol",
                "load", "outputs_check", "facts", "bit_config", "budgets", "config",
                "predicted", "measured", "versions", "timing", "rounds", "extra", "accuracy"}


def decode(row: dict) -> dict:
    for k in JSON_COLUMNS & row.keys():
        if isinstance(row[k], str):
            row[k] = json.loads(row[k])
    return row


def resolve_url(url_or_path: str | Path | None = None) -> str:
    """`None` -> $HILQ_DB or results/hilq.sqlite; a plain path -> SQLite; a URL as given,
    except that a bare `postgresql://` (or `postgres://`) gets the psycopg 3 driver hilq ships
    with instead of SQLAlchemy's default psycopg2."""
    target = url_or_path if url_or_path not in (None, "") else os.environ.get("HILQ_DB")
    target = str(target) if target else str(DEFAULT_PATH)
    if "://" in target:
        scheme, rest = target.split("://", 1)
        return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else target
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def redact(url: str) -> str:
    """A database URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def create_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        _sqlite_events(engine)
    return engine


def _sqlite_events(engine: sa.Engine) -> None:
    """WAL, foreign keys, a busy timeout, and real transactions (pysqlite's own BEGIN handling
    skips DDL and SELECTs); write transactions take the lock up front (BEGIN IMMEDIATE) so two
    writers wait for each other instead of failing half-way."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        _wal(cur)
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("hilq_write") else "BEGIN")


def _wal(cur, wait_s: float = 30.0) -> None:
    """Switch to WAL. On a file another process is creating this very moment the switch can
    report "database is locked" without waiting (SQLite runs no busy handler for it), so it
    is retried, like the busy timeout would, for up to `wait_s`."""
    import sqlite3
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Connections:
    """An engine and this thread's open write transaction, if any."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """Commit on success, roll back everything on an exception; nested calls join."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self.engine.connect() as conn:
            conn.info["hilq_write"] = True
            try:
                with conn.begin():
                    self._local.conn = conn
                    try:
                        yield conn
                    finally:
                        self._local.conn = None
            finally:
                conn.info["hilq_write"] = False

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """The open transaction of this thread (to see its own writes), or a fresh connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self.engine.connect() as conn:
            yield conn


def insert_ignore(c: sa.Connection, table: sa.Table, values: dict) -> bool:
    """Insert one row unless a unique key already holds it; True if it was inserted. Two
    writers racing for the same row (say the same device, registered by both) both succeed:
    ON CONFLICT DO NOTHING waits for the other's commit instead of raising a key violation.
    Other databases get a savepoint around a plain insert."""
    name = c.dialect.name
    if name in ("sqlite", "postgresql"):
        dialect = importlib.import_module(f"sqlalchemy.dialects.{name}")
        stmt = (dialect.insert(table).values(**values).on_conflict_do_nothing()
                .returning(*table.primary_key.columns))
        return c.execute(stmt).first() is not None
    try:
        with c.begin_nested():
            c.execute(table.insert().values(**values))
        return True
    except sa.exc.IntegrityError:
        return False
