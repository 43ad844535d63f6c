"""Tables out of the store: a pandas DataFrame, or CSV / Parquet files for other tools."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import sqlalchemy as sa

from .connection import JSON_COLUMNS, StoreError
from .schema import TABLES, meta


def load_frame(store, table: str = "measurements", *, run_id: str | None = None,
               decode_json: bool = False):
    """One table as a pandas DataFrame (JSON columns stay text unless `decode_json`)."""
    import pandas as pd

    if table not in meta.tables:
        raise StoreError(f"unknown table {table!r} (use {', '.join(TABLES)})")
    t = meta.tables[table]
    q = sa.select(t)
    if run_id is not None and "run_id" in t.c:
        q = q.where(t.c.run_id == run_id)
    with store._read() as c:
        df = pd.read_sql(q, c)
    if decode_json:
        for col in JSON_COLUMNS & set(df.columns):
            df[col] = df[col].map(lambda s: json.loads(s) if isinstance(s, str) else s)
    return df


def export(store, out_dir: str | Path, fmt: str = "csv",
           tables: Iterable[str] = TABLES) -> list[Path]:
    """Write each table to `<out_dir>/<table>.csv|.parquet`; returns the files written."""
    if fmt not in ("csv", "parquet"):
        raise StoreError(f"unknown export format {fmt!r} (use csv or parquet)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        df = load_frame(store, table)
        path = out / f"{table}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False)
        written.append(path)
    return written
