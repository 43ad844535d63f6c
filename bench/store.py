"""The results store: every run, device, variant, measurement, cost table, allocation,
accuracy and regression verdict, behind one module.

SQLAlchemy Core against SQLite by default (`results/hilq.sqlite`); a database URL
(`postgresql://...`, driven by psycopg 3: `pip install 'hilq[postgres]'`) goes through the
same code, so a team can share nightly history; the tests run it against a real server.
Writes happen in transactions (`with store.transaction():`), and every row that a run
produces has a natural key, so a run killed half-way can be re-run: what is already stored is
skipped (`done_keys`) and a repeated insert is a no-op, never a duplicate.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import os
import platform
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from importlib import metadata as _md
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Column, Float, ForeignKey, Integer, String, Table, Text, UniqueConstraint

DEFAULT_PATH = Path("results") / "hilq.sqlite"
SCHEMA_VERSION = 4
RESUME_WITHIN_H = 12.0      # an unfinished run older than this is not resumed by a new one
RUN_STATUSES = ("running", "ok", "failed", "regressed", "interrupted", "budget_missed")

# Facts that change from one run to the next on the same machine; left out of the device key.
VOLATILE_FACTS = frozenset({"time", "timestamp", "date", "uptime", "uptime_s", "load",
                            "loadavg", "load_avg", "mem_available", "mem_available_mb",
                            "free_memory", "temperature", "temperature_c", "pid", "boot_time"})
# Library versions recorded with every run (looked up from metadata, nothing is imported).
VERSIONED = ("numpy", "torch", "onnx", "onnxruntime", "openvino", "tensorrt", "scipy",
             "pandas", "sqlalchemy")
# Metric name -> measurements column, and which direction is worse.
METRICS = {"p50": "p50_ms", "p90": "p90_ms", "p99": "p99_ms", "mean": "mean_ms",
           "energy_j": "energy_j", "throughput": "throughput",
           "top1": "top1", "agreement": "agreement_fp32"}     # accuracy on the device
HIGHER_IS_BETTER = frozenset({"throughput", "top1", "agreement"})

meta = sa.MetaData()
_name = String(200)

schema_version = Table(
    "schema_version", meta,
    Column("version", Integer, primary_key=True),
    Column("applied", String(32), nullable=False),
    Column("description", Text),
)
runs = Table(
    "runs", meta,
    Column("id", String(64), primary_key=True),
    Column("started", String(32), nullable=False),   # ISO 8601 UTC: sorts as text everywhere
    Column("ended", String(32)),
    Column("status", String(16), nullable=False),    # one of RUN_STATUSES
    Column("git_sha", String(64)),
    Column("config_hash", String(64), nullable=False, index=True),
    Column("config", Text),
    Column("host", _name),
    Column("hilq_version", String(32)),
    Column("versions", Text),                        # python and library versions, JSON
    Column("seed", Integer),
)
devices = Table(
    "devices", meta,
    Column("id", String(16), primary_key=True),      # hash of name + stable facts
    Column("name", _name, nullable=False),
    Column("facts", Text),
    Column("first_seen", String(32)),
)
variants = Table(
    "variants", meta,
    Column("id", String(16), primary_key=True),      # hash of model, name, artifact, config
    Column("model", _name, nullable=False),
    Column("name", Text, nullable=False),
    Column("artifact_sha256", String(64)),
    Column("bit_config", Text),
)
measurements = Table(
    "measurements", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", ForeignKey("runs.id"), nullable=False, index=True),
    Column("model", _name, nullable=False),
    Column("variant", Text, nullable=False),
    Column("device", _name, nullable=False),
    Column("runtime", _name, nullable=False),
    Column("kind", String(32), nullable=False),      # bench | cost | search | ...
    Column("round", Integer, nullable=False),        # alternating-round index
    Column("device_id", ForeignKey("devices.id")),
    Column("variant_id", ForeignKey("variants.id")),
    Column("status", String(16), nullable=False),
    Column("failure", String(32)),
    Column("reason", Text),
    Column("busy", sa.Boolean),
    Column("p50_ms", Float), Column("p90_ms", Float), Column("p99_ms", Float),
    Column("mean_ms", Float), Column("std_ms", Float), Column("min_ms", Float),
    Column("max_ms", Float), Column("n_samples", Integer),
    Column("throughput", Float), Column("energy_j", Float), Column("avg_power_w", Float),
    Column("latency", Text), Column("samples_ms", Text), Column("device_latency", Text),
    Column("power", Text), Column("kernels", Text), Column("protocol", Text),
    Column("load", Text), Column("outputs_check", Text), Column("timing", Text),
    Column("rounds", Text), Column("harness_overhead_ms", Float),
    Column("extra", Text),                           # Measurement fields newer than this table
    # accuracy measured on the device over an evaluation set (schema v3): the figures as
    # JSON, device top-1 / agreement with FP32 as numbers to query, and the set's sha256
    Column("accuracy", Text), Column("top1", Float), Column("agreement_fp32", Float),
    Column("eval_sha256", String(64)),
    # peak resident memory of the agent while loading and in the timed window (schema v4);
    # all of the agent's memory figures are in `extra` (Measurement.memory)
    Column("load_peak_mb", Float), Column("timed_peak_mb", Float),
    # an MLPerf scenario run by LoadGen (schema v4): its name, VALID or not, and its metric;
    # LoadGen's whole result, its summary log included, is in `extra` (Measurement.scenario)
    Column("scenario", String(16)), Column("scenario_valid", sa.Boolean),
    Column("scenario_value", Float),
    Column("artifact_sha256", String(64)),
    Column("created", String(32)),
    UniqueConstraint("run_id", "model", "variant", "device", "runtime", "kind", "round",
                     name="uq_measurement"),
)
cost_tables = Table(
    "cost_tables", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", ForeignKey("runs.id"), nullable=False, index=True),
    Column("model", _name, nullable=False),
    Column("device", _name, nullable=False),
    Column("runtime", _name, nullable=False),
    Column("layer", _name, nullable=False),
    Column("precision", String(32), nullable=False),
    Column("latency_ms", Float), Column("energy_mj", Float), Column("size_bits", Float),
    Column("bops", Float), Column("sensitivity", Float),
    Column("method", String(64)),
    UniqueConstraint("run_id", "model", "device", "runtime", "layer", "precision",
                     name="uq_cost"),
)
allocations = Table(
    "allocations", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", ForeignKey("runs.id"), nullable=False, index=True),
    Column("model", _name, nullable=False),
    Column("device", _name, nullable=False),
    Column("runtime", _name, nullable=False),
    Column("name", _name, nullable=False),           # which budget point, e.g. "lat<=5ms"
    Column("variant", Text),                         # the variant name it was benchmarked as
    Column("budgets", Text), Column("config", Text),
    Column("predicted", Text), Column("measured", Text),
    Column("accuracy", Float),
    UniqueConstraint("run_id", "model", "device", "runtime", "name", name="uq_allocation"),
)
accuracy = Table(
    "accuracy", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", ForeignKey("runs.id"), nullable=False, index=True),
    Column("model", _name, nullable=False),
    Column("variant", Text, nullable=False),
    Column("dataset", _name, nullable=False),
    Column("top1", Float), Column("n", Integer),
    UniqueConstraint("run_id", "model", "variant", "dataset", name="uq_accuracy"),
)
regressions = Table(
    "regressions", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", ForeignKey("runs.id"), nullable=False, index=True),
    Column("model", _name, nullable=False),
    Column("variant", Text, nullable=False),
    Column("device", _name, nullable=False),
    Column("runtime", _name, nullable=False),
    Column("metric", String(32), nullable=False),
    Column("baseline", Float), Column("current", Float), Column("change", Float),
    Column("p_value", Float), Column("z", Float), Column("n_history", Integer),
    Column("flagged", sa.Boolean, nullable=False),
    Column("method", String(64)),
    Column("note", Text),
    Column("mde", Float),          # minimum detectable effect of the series (bench.regress)
    UniqueConstraint("run_id", "model", "variant", "device", "runtime", "metric",
                     name="uq_regression"),
)
baseline_resets = Table(
    "baseline_resets", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", ForeignKey("runs.id"), nullable=False),  # first run of the new baseline
    Column("model", _name, nullable=False),
    Column("variant", Text, nullable=False),
    Column("device", _name, nullable=False),
    Column("runtime", _name, nullable=False),
    Column("metric", String(32)),                    # NULL = every metric
    Column("reason", Text),
    Column("created", String(32)),
)
TABLES = ("runs", "devices", "variants", "measurements", "cost_tables", "allocations",
          "accuracy", "regressions", "baseline_resets")


# Ordered (version, description, fn(conn)) applied to databases older than SCHEMA_VERSION, all
# pending ones in one transaction. A fresh database gets the current tables and is stamped
# directly. Version 1 is the first schema; the next change adds its Column above, bumps
# SCHEMA_VERSION and appends e.g. (2, "runs.note", lambda c: c.execute(sa.text(
# "ALTER TABLE runs ADD COLUMN note TEXT"))).
MIGRATIONS: list[tuple[int, str, object]] = [
    (2, "regressions.mde", lambda c: c.execute(sa.text(
        "ALTER TABLE regressions ADD COLUMN mde FLOAT"))),
    (3, "measurements.accuracy, top1, agreement_fp32, eval_sha256", lambda c: [c.execute(
        sa.text(f"ALTER TABLE measurements ADD COLUMN {col}")) for col in (
            "accuracy TEXT", "top1 FLOAT", "agreement_fp32 FLOAT", "eval_sha256 VARCHAR(64)")]),
    (4, "measurements.load_peak_mb, timed_peak_mb, scenario, scenario_valid, scenario_value",
     lambda c: [c.execute(sa.text(f"ALTER TABLE measurements ADD COLUMN {col}")) for col in (
         "load_peak_mb FLOAT", "timed_peak_mb FLOAT", "scenario VARCHAR(16)",
         "scenario_valid BOOLEAN", "scenario_value FLOAT")]),
]


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


def config_hash(config) -> str:
    return hashlib.sha256((dumps(config) or "null").encode()).hexdigest()


def stable_facts(facts: dict) -> dict:
    return {k: v for k, v in (facts or {}).items() if k not in VOLATILE_FACTS}


def device_id(name: str, facts: dict) -> str:
    return hashlib.sha256(dumps([name, stable_facts(facts)]).encode()).hexdigest()[:16]


def variant_id(model: str, name: str, artifact_sha256: str | None, bit_config) -> str:
    key = dumps([model, name, artifact_sha256, dumps(bit_config)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def git_sha(cwd: str | Path | None = None) -> str | None:
    """HEAD of the checkout hilq runs from; None outside git or before the first commit."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


@functools.cache
def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            versions[dist] = _md.version(dist)
        except _md.PackageNotFoundError:
            pass
    return versions


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


def _sqlite_events(engine: sa.Engine) -> None:
    """WAL, foreign keys, a busy timeout, and real transactions (pysqlite's own BEGIN handling
    skips DDL and SELECTs); write transactions take the lock up front (BEGIN IMMEDIATE) so two
    writers wait for each other instead of failing half-way."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("hilq_write") else "BEGIN")


class Store:
    """One database. Methods that write open a transaction, or join the one already open in
    this thread (`with store.transaction():` around several calls makes them one unit)."""

    def __init__(self, url: str):
        self.url = url
        self.name = _redact(url)          # for messages: no password
        self.engine = sa.create_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        if self.is_sqlite:
            _sqlite_events(self.engine)
        self._local = threading.local()
        self._migrate()

    # ---------------------------------------------------------------- connections
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
    def _read(self) -> Iterator[sa.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self.engine.connect() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- schema
    def schema_version(self) -> int:
        with self._read() as c:
            if not sa.inspect(c).has_table("schema_version"):
                return 0
            return c.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0

    def _migrate(self) -> None:
        with self.transaction() as c:
            has_version = sa.inspect(c).has_table("schema_version")
            current = (c.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
                       if has_version else 0) or 0
            if current > SCHEMA_VERSION:
                raise StoreError(f"{self.name}: schema version {current} is newer than this "
                                 f"hilq ({SCHEMA_VERSION}); upgrade hilq")
            if current == 0:
                if set(TABLES) & set(sa.inspect(c).get_table_names()):
                    raise StoreError(f"{self.name}: has hilq tables but no schema_version")
                meta.create_all(c)
                c.execute(schema_version.insert().values(
                    version=SCHEMA_VERSION, applied=now(), description="created"))
                return
            for version, description, fn in MIGRATIONS:
                if current < version <= SCHEMA_VERSION:
                    fn(c)
                    c.execute(schema_version.insert().values(
                        version=version, applied=now(), description=description))

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check` ("ok" when sound); "n/a" on other databases."""
        if not self.is_sqlite:
            return "n/a"
        with self.engine.connect() as c:
            rows = c.exec_driver_sql("PRAGMA integrity_check").fetchall()
        return "; ".join(str(r[0]) for r in rows)

    # ---------------------------------------------------------------- runs
    def begin_run(self, config: dict, *, run_id: str | None = None, seed: int | None = None,
                  resume: bool = True, resume_within_h: float = RESUME_WITHIN_H) -> str:
        """Start a run, or resume the unfinished one with the same config started within
        `resume_within_h` hours (after a crash or kill), so the rerun continues under the same
        id; older unfinished ones are marked `interrupted` (tonight is not last night).
        The id is `<UTC start time>-<config hash>`; an explicit `run_id` is reopened."""
        chash = config_hash(config)
        with self.transaction() as c:
            if run_id is not None:
                row = c.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().first()
                if row is not None:
                    if row["config_hash"] != chash:
                        raise StoreError(f"run {run_id} exists with a different config")
                    c.execute(runs.update().where(runs.c.id == run_id)
                              .values(status="running", ended=None))
                    return run_id
            elif resume:
                cutoff = (datetime.now(UTC) - timedelta(hours=resume_within_h)).strftime(
                    "%Y-%m-%dT%H:%M:%S.%fZ")
                unfinished = (runs.c.config_hash == chash) & (runs.c.status == "running")
                found = c.execute(sa.select(runs.c.id).where(unfinished, runs.c.started >= cutoff)
                                  .order_by(runs.c.started.desc())).scalar()
                if found:
                    return found
                c.execute(runs.update().where(unfinished, runs.c.started < cutoff)
                          .values(status="interrupted"))
            started = now()
            if run_id is None:
                base = f"{started[:19].replace('-', '').replace(':', '')}Z-{chash[:8]}"
                taken = set(c.execute(sa.select(runs.c.id).where(runs.c.id.like(f"{base}%")))
                            .scalars())
                run_id, k = base, 1
                while run_id in taken:
                    k += 1
                    run_id = f"{base}-{k}"
            c.execute(runs.insert().values(
                id=run_id, started=started, status="running", git_sha=git_sha(),
                config_hash=chash, config=dumps(config), host=socket.gethostname(),
                hilq_version=_hilq_version(), versions=dumps(library_versions()), seed=seed))
        return run_id

    def finish_run(self, run_id: str, status: str = "ok") -> None:
        if status not in RUN_STATUSES:
            raise StoreError(f"unknown run status {status!r} (use {', '.join(RUN_STATUSES)})")
        with self.transaction() as c:
            done = c.execute(runs.update().where(runs.c.id == run_id)
                             .values(ended=now(), status=status))
            if done.rowcount == 0:
                raise StoreError(f"no run {run_id!r}")

    def run(self, run_id: str) -> dict | None:
        with self._read() as c:
            row = c.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().first()
        return _decode(dict(row)) if row else None

    def runs(self, limit: int | None = None) -> list[dict]:
        """Newest first."""
        q = sa.select(runs).order_by(runs.c.started.desc())
        if limit:
            q = q.limit(limit)
        with self._read() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def latest_run(self) -> str | None:
        with self._read() as c:
            return c.execute(sa.select(runs.c.id).order_by(runs.c.started.desc())).scalar()

    def resolve_run(self, run: str | None) -> str:
        """`latest`/None -> the newest run id; otherwise the id itself, checked."""
        if run in (None, "", "latest"):
            found = self.latest_run()
            if not found:
                raise StoreError(f"no runs in {self.name}")
            return found
        if self.run(run) is None:
            raise StoreError(f"no run {run!r} in {self.name}")
        return run

    # ---------------------------------------------------------------- measurements
    def add_measurement(self, run_id: str, m, *, kind: str = "bench", round: int = 0,
                        bit_config=None) -> bool:
        """Store one `devices.measurement.Measurement` (all of it: stats, raw samples, power,
        facts). Returns False, changing nothing, when its key is already stored."""
        key = dict(run_id=run_id, model=m.model, variant=m.variant, device=m.device,
                   runtime=m.runtime, kind=kind, round=round)
        lat, acc = m.latency_ms or {}, getattr(m, "accuracy", None) or {}
        with self.transaction() as c:
            if c.execute(sa.select(measurements.c.id).where(
                    *[measurements.c[k] == v for k, v in key.items()])).first():
                return False
            did = self._ensure_device(c, m.device, m.facts)
            vid = self._ensure_variant(c, m.model, m.variant, m.artifact_sha256, bit_config)
            return _insert_ignore(c, measurements, dict(
                **key, device_id=did, variant_id=vid, status=m.status, failure=m.failure,
                reason=m.reason, busy=bool((m.load or {}).get("busy", False)),
                **{f"{s}_ms": _num(lat.get(s)) for s in ("p50", "p90", "p99", "mean", "std",
                                                         "min", "max")},
                n_samples=len(m.samples_ms or []) or _int(lat.get("n")),
                throughput=_num(m.throughput), energy_j=_num(m.energy_j_per_inference),
                avg_power_w=_num((m.power or {}).get("avg_w")),
                latency=dumps(lat), samples_ms=dumps(list(m.samples_ms or [])),
                device_latency=dumps(m.device_latency_ms), power=dumps(m.power),
                kernels=dumps(m.kernels), protocol=dumps(m.protocol), load=dumps(m.load),
                outputs_check=dumps(m.outputs_check), timing=dumps(getattr(m, "timing", None)),
                rounds=dumps(getattr(m, "rounds", None)),
                harness_overhead_ms=_num(getattr(m, "harness_overhead_ms", None)),
                extra=dumps(_extra_fields(m)), artifact_sha256=m.artifact_sha256,
                accuracy=dumps(acc or None), top1=_num(acc.get("top1")),
                agreement_fp32=_num(acc.get("agreement_fp32")),
                eval_sha256=acc.get("eval_sha256"),
                load_peak_mb=_num((m.memory or {}).get("load_peak_mb")),
                timed_peak_mb=_num((m.memory or {}).get("timed_peak_mb")),
                scenario=(m.scenario or {}).get("scenario"),
                scenario_valid=(m.scenario or {}).get("valid"),
                scenario_value=_num((m.scenario or {}).get("value")), created=now()))

    def _ensure_device(self, c: sa.Connection, name: str, facts: dict) -> str:
        did = device_id(name, facts)
        _insert_ignore(c, devices, dict(id=did, name=name, facts=dumps(facts or {}),
                                        first_seen=now()))
        return did

    def _ensure_variant(self, c, model, name, artifact_sha256, bit_config) -> str:
        vid = variant_id(model, name, artifact_sha256, bit_config)
        _insert_ignore(c, variants, dict(id=vid, model=model, name=name,
                                         artifact_sha256=artifact_sha256,
                                         bit_config=dumps(bit_config)))
        return vid

    def done_keys(self, run_id: str, *, kind: str | None = None,
                  include_failed: bool = True) -> set[tuple]:
        """(model, variant, device, runtime, kind, round) of every stored measurement of a
        run, so a resumed run skips them."""
        m = measurements.c
        q = sa.select(m.model, m.variant, m.device, m.runtime, m.kind, m.round).where(
            m.run_id == run_id)
        if kind is not None:
            q = q.where(m.kind == kind)
        if not include_failed:
            q = q.where(m.status != "failed")
        with self._read() as c:
            return {tuple(r) for r in c.execute(q)}

    def measurements(self, run_id: str, *, kind: str | None = None) -> list[dict]:
        """Rows of one run with JSON columns decoded (samples_ms is a list)."""
        q = sa.select(measurements).where(measurements.c.run_id == run_id).order_by(
            measurements.c.id)
        if kind is not None:
            q = q.where(measurements.c.kind == kind)
        with self._read() as c:
            return [_decode(dict(r)) for r in c.execute(q).mappings()]

    # ---------------------------------------------------------------- search & accuracy
    def add_accuracy(self, run_id: str, model: str, variant: str, top1: float, n: int,
                     dataset: str) -> bool:
        key = dict(run_id=run_id, model=model, variant=variant, dataset=dataset)
        return self._insert_once(accuracy, key, dict(top1=_num(top1), n=_int(n)))

    def add_cost_rows(self, run_id: str, rows: Iterable[dict]) -> int:
        """Per-layer cost table rows (model, device, runtime, layer, precision, latency_ms,
        energy_mj, size_bits, bops, sensitivity, method); returns how many were new."""
        cols = set(cost_tables.c.keys()) - {"id", "run_id"}
        keyc = ("model", "device", "runtime", "layer", "precision")
        with self.transaction() as c:
            have = {tuple(r) for r in c.execute(
                sa.select(*[cost_tables.c[k] for k in keyc]).where(
                    cost_tables.c.run_id == run_id))}
            new = []
            for row in rows:
                unknown = set(row) - cols
                if unknown:
                    raise ValueError(f"unknown cost column(s): {', '.join(sorted(unknown))}")
                k = tuple(row[c_] for c_ in keyc)
                if k not in have:
                    have.add(k)
                    new.append({**{c_: None for c_ in cols}, **row, "run_id": run_id})
            for row in new:
                _insert_ignore(c, cost_tables, row)
        return len(new)

    def add_allocation(self, run_id: str, model: str, device: str, runtime: str, name: str,
                       *, budgets: dict, config, predicted: dict, measured: dict | None = None,
                       accuracy: float | None = None, variant: str | None = None) -> bool:
        """One searched config: `config` is a BitConfig (or its dict), `predicted`/`measured`
        dicts such as {"latency_ms": .., "energy_mj": .., "size_bits": ..}."""
        key = dict(run_id=run_id, model=model, device=device, runtime=runtime, name=name)
        return self._insert_once(allocations, key, dict(
            variant=variant, budgets=dumps(budgets), config=dumps(config),
            predicted=dumps(predicted), measured=dumps(measured), accuracy=_num(accuracy)))

    def set_allocation_measured(self, run_id: str, model: str, device: str, runtime: str,
                                name: str, measured: dict, accuracy: float | None = None):
        """Fill in what re-benchmarking the chosen config gave (search writes it later)."""
        a = allocations.c
        values = {"measured": dumps(measured)}
        if accuracy is not None:
            values["accuracy"] = float(accuracy)
        with self.transaction() as c:
            c.execute(allocations.update().where(
                a.run_id == run_id, a.model == model, a.device == device,
                a.runtime == runtime, a.name == name).values(**values))

    def _insert_once(self, table: Table, key: dict, values: dict) -> bool:
        with self.transaction() as c:
            return _insert_ignore(c, table, {**key, **values})

    # ---------------------------------------------------------------- history & regressions
    def history(self, model: str, variant: str, device: str, runtime: str,
                metric: str = "p50", last_n: int = 14, *, before_run: str | None = None,
                through_run: str | None = None, samples: bool = False,
                respect_resets: bool = True, eval_sha256: str | None = None) -> list[dict]:
        """Per run (oldest first, the last `last_n`, none before the latest baseline reset
        unless `respect_resets` is False, started before `before_run` or up to and including
        `through_run`): run_id, started, value (median over rounds of `metric`), rounds (each
        round's value, sorted) and, if asked, the raw samples of all its rounds. Failed runs
        and measurements are left out. `eval_sha256`: only figures measured on that
        evaluation set (accuracy on another set is not comparable)."""
        col = measurements.c[METRICS[metric]]
        m, r = measurements.c, runs.c
        where = [m.model == model, m.variant == variant, m.device == device,
                 m.runtime == runtime, m.kind == "bench", m.status != "failed",
                 r.status != "failed", col.is_not(None)]
        if eval_sha256 is not None:
            where.append(m.eval_sha256 == eval_sha256)
        if before_run is not None:
            where.append(r.started < sa.select(r.started).where(r.id == before_run)
                         .scalar_subquery())
        if through_run is not None:
            where.append(r.started <= sa.select(r.started).where(r.id == through_run)
                         .scalar_subquery())
        with self._read() as c:
            reset = (self.reset_since(model, variant, device, runtime, metric, conn=c)
                     if respect_resets else None)
            if reset is not None:
                where.append(r.started >= reset)
            ids = (sa.select(r.id).join_from(measurements, runs, m.run_id == r.id)
                   .where(*where).group_by(r.id, r.started).order_by(r.started.desc()))
            if last_n:
                ids = ids.limit(last_n)
            wanted = list(c.execute(ids).scalars())
            q = (sa.select(m.run_id, r.started, col, m.samples_ms if samples else sa.null())
                 .join_from(measurements, runs, m.run_id == r.id)
                 .where(*where, m.run_id.in_(wanted)))
            rows = c.execute(q.order_by(r.started, m.round)).all() if wanted else []
        per_run: dict[str, dict] = {}
        for run_id, started, value, raw in rows:
            e = per_run.setdefault(run_id, {"run_id": run_id, "started": started,
                                            "values": [], "samples": []})
            e["values"].append(value)
            if samples and raw:
                e["samples"].extend(json.loads(raw))
        out = []
        for e in per_run.values():
            e["rounds"] = sorted(e.pop("values"))
            e["value"] = _median(e["rounds"])
            if not samples:
                e.pop("samples")
            out.append(e)
        return out

    def config_latencies(self, model: str, device: str, runtime: str) -> list[dict]:
        """Every good whole-network p50 of `model` on (device, runtime), of any kind and run,
        with its BitConfig and protocol: the latency model's data (run_id, variant, round,
        p50_ms, bit_config, protocol), oldest first."""
        m, v, r = measurements.c, variants.c, runs.c
        q = (sa.select(m.run_id, m.variant, m.round, m.kind, m.p50_ms, v.bit_config, m.protocol)
             .join_from(measurements, variants, m.variant_id == v.id)
             .join(runs, m.run_id == r.id)
             .where(m.model == model, m.device == device, m.runtime == runtime,
                    m.status != "failed", m.p50_ms.is_not(None), m.kind != "profile")
             .order_by(r.started, m.id))
        with self._read() as c:
            rows = [dict(x) for x in c.execute(q).mappings()]
        for row in rows:
            for k in ("bit_config", "protocol"):
                row[k] = json.loads(row[k]) if isinstance(row[k], str) else row[k]
        return rows

    def reset_since(self, model, variant, device, runtime, metric=None, *, conn=None):
        """Start time of the run that begins the current baseline, or None."""
        b, r = baseline_resets.c, runs.c
        q = (sa.select(sa.func.max(r.started)).join_from(baseline_resets, runs,
                                                          b.run_id == r.id)
             .where(b.model == model, b.variant == variant, b.device == device,
                    b.runtime == runtime,
                    sa.or_(b.metric.is_(None), b.metric == metric) if metric else sa.true()))
        with (_given(conn) if conn is not None else self._read()) as c:
            return c.execute(q).scalar()

    def resets(self, model, variant, device, runtime) -> set[str]:
        """Run ids at which an intended change was marked for this key (any metric)."""
        b = baseline_resets.c
        with self._read() as c:
            return set(c.execute(sa.select(b.run_id).where(
                b.model == model, b.variant == variant, b.device == device,
                b.runtime == runtime)).scalars())

    def mark_intended(self, run_id: str, model: str, variant: str, device: str, runtime: str,
                      *, metric: str | None = None, reason: str = "") -> None:
        """An intended change: history before `run_id` no longer counts as the baseline."""
        with self.transaction() as c:
            if not c.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first():
                raise StoreError(f"no run {run_id!r}")
            m = measurements.c
            if not c.execute(sa.select(m.id).where(
                    m.run_id == run_id, m.model == model, m.variant == variant,
                    m.device == device, m.runtime == runtime)).first():
                raise StoreError(f"run {run_id} has no measurement of {model} {variant} on "
                                 f"{device}/{runtime}")
            c.execute(baseline_resets.insert().values(
                run_id=run_id, model=model, variant=variant, device=device, runtime=runtime,
                metric=metric, reason=reason, created=now()))

    def replace_regressions(self, run_id: str, rows: Iterable[dict]) -> None:
        """The verdicts of one detection pass replace any earlier ones for the run."""
        rows = [{**r, "run_id": run_id} for r in rows]
        with self.transaction() as c:
            c.execute(regressions.delete().where(regressions.c.run_id == run_id))
            if rows:
                c.execute(regressions.insert(), rows)

    def regressions(self, run_id: str | None = None, *, flagged_only: bool = False):
        q = sa.select(regressions).order_by(regressions.c.id)
        if run_id is not None:
            q = q.where(regressions.c.run_id == run_id)
        if flagged_only:
            q = q.where(regressions.c.flagged.is_(True))
        with self._read() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def rows(self, table: str, run_id: str | None = None) -> list[dict]:
        """All rows of one table (of one run, where the table has runs), JSON decoded."""
        t = meta.tables[table]
        q = sa.select(t)
        if run_id is not None and "run_id" in t.c:
            q = q.where(t.c.run_id == run_id)
        with self._read() as c:
            return [_decode(dict(r)) for r in c.execute(q).mappings()]


@contextmanager
def _given(conn):
    yield conn


_JSON_COLUMNS = {"latency", "samples_ms", "device_latency", "power", "kernels", "protocol",
                 "load", "outputs_check", "facts", "bit_config", "budgets", "config",
                 "predicted", "measured", "versions", "timing", "rounds", "extra",
                 "accuracy"}


def _decode(row: dict) -> dict:
    for k in _JSON_COLUMNS & row.keys():
        if isinstance(row[k], str):
            row[k] = json.loads(row[k])
    return row


_STORED_FIELDS = {"model", "variant", "device", "runtime", "status", "reason", "failure",
                  "latency_ms", "samples_ms", "device_latency_ms", "throughput",
                  "energy_j_per_inference", "power", "kernels", "facts", "protocol", "load",
                  "artifact_sha256", "outputs_check", "timing", "rounds", "harness_overhead_ms",
                  "accuracy"}


def _extra_fields(m) -> dict | None:
    """Fields a newer `Measurement` has that no column holds yet: kept, not dropped."""
    extra = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
             if f.name not in _STORED_FIELDS and getattr(m, f.name) not in (None, {}, [])}
    return extra or None


def _num(x) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def _int(x) -> int | None:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None


def _median(vals: list[float]) -> float:
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def _hilq_version() -> str:
    from bench import __version__

    return __version__


def open_store(url_or_path: str | Path | None = None) -> Store:
    """Open (creating or migrating) the store: a URL, a SQLite path, $HILQ_DB, or the
    default `results/hilq.sqlite` under the current directory."""
    url = resolve_url(url_or_path)
    try:
        return Store(url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, sa.exc.OperationalError,
            ModuleNotFoundError) as e:
        why = str(getattr(e, "orig", None) or e).splitlines()[0]
        if isinstance(e, ModuleNotFoundError) and "psycopg" in why:
            why += " (pip install 'hilq[postgres]')"
        raise StoreError(f"cannot open store {_redact(url)}: {why}") from None


def _insert_ignore(c: sa.Connection, table: Table, values: dict) -> bool:
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


def _redact(url: str) -> str:
    """A database URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def load_frame(store: Store, table: str = "measurements", *, run_id: str | None = None,
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
        for col in _JSON_COLUMNS & set(df.columns):
            df[col] = df[col].map(lambda s: json.loads(s) if isinstance(s, str) else s)
    return df


def export(store: Store, out_dir: str | Path, fmt: str = "csv",
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
