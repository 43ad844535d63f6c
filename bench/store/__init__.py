"""The results store: every run, device, variant, measurement, cost table, allocation,
accuracy and regression verdict.

SQLAlchemy Core against SQLite by default (`results/hilq.sqlite`); a database URL
(`postgresql://...`, driven by psycopg 3: `pip install 'hilq[postgres]'`) goes through the
same code, so a team can share nightly history; the tests run it against a real server.
Writes happen in transactions (`with store.transaction():`), and every row that a run
produces has a natural key, so a run killed half-way can be re-run: what is already stored is
skipped (`done_keys`) and a repeated insert is a no-op, never a duplicate.

One module per concern: `schema` (tables, version, migrations), `connection` (URLs, engines,
transactions), `rows` (the Measurement <-> row map), `provenance` (git SHA, versions,
ids), `db` (the `Store` and its queries), `export` (pandas, CSV, Parquet).
"""

from .connection import DEFAULT_PATH, StoreError, dumps, now, resolve_url
from .db import RESUME_WITHIN_H, Store, open_store
from .export import export, load_frame
from .provenance import config_hash, device_id, git_sha, library_versions, variant_id
from .rows import Key, from_row, to_row
from .schema import (  # the tables are in .schema; `meta` and `measurements` for tests
    HIGHER_IS_BETTER,
    METRICS,
    MIGRATIONS,
    RUN_STATUSES,
    SCHEMA_VERSION,
    TABLES,
    measurements,
    meta,
)

__all__ = ["DEFAULT_PATH", "HIGHER_IS_BETTER", "METRICS", "MIGRATIONS", "RESUME_WITHIN_H",
           "RUN_STATUSES", "SCHEMA_VERSION", "TABLES", "Key", "Store", "StoreError",
           "config_hash", "device_id", "dumps", "export", "from_row", "git_sha",
           "library_versions", "load_frame", "meta", "now", "open_store", "resolve_url",
           "to_row", "variant_id", "measurements"]
