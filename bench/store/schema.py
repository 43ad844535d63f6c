"""The store's tables, its version, and the migrations that bring an older database up to it.

SQLAlchemy Core metadata: the same tables on SQLite and PostgreSQL. A fresh database gets the
current tables and is stamped directly; an older one gets every pending migration in one
transaction (`migrate`).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Column, Float, ForeignKey, Integer, String, Table, Text, UniqueConstraint

from .connection import StoreError, now

SCHEMA_VERSION = 4
RUN_STATUSES = ("running", "ok", "failed", "regressed", "interrupted", "budget_missed")
# Metric name -> measurements column, and which direction is worse.
METRICS = {"p50": "p50_ms", "p90": "p90_ms", "p99": "p99_ms", "mean": "mean_ms",
           "energy_j": "energy_j", "throughput": "throughput",
           "top1": "top1", "agreement": "agreement_fp32"}     # accuracy on the device
HIGHER_IS_BETTER = frozenset({"throughput", "top1", "agreement"})
MIGRATION_LOCK = 0x68696C71          # "hilq": PostgreSQL advisory lock around create/migrate

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



def migrate(c: sa.Connection, name: str) -> None:
    """Create the tables in an empty database, or apply the pending migrations, stamping each
    version; a newer schema than this hilq's, or hilq tables without a version, is refused.
    Two processes opening one fresh database at once (a nightly and its Ray tasks) take
    turns: SQLite's write transaction is BEGIN IMMEDIATE, PostgreSQL's holds an advisory lock."""
    if c.dialect.name == "postgresql":
        c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
    has_version = sa.inspect(c).has_table("schema_version")
    current = (c.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
               if has_version else 0) or 0
    if current > SCHEMA_VERSION:
        raise StoreError(f"{name}: schema version {current} is newer than this "
                         f"hilq ({SCHEMA_VERSION}); upgrade hilq")
    if current == 0:
        if set(TABLES) & set(sa.inspect(c).get_table_names()):
            raise StoreError(f"{name}: has hilq tables but no schema_version")
        meta.create_all(c)
        c.execute(schema_version.insert().values(
            version=SCHEMA_VERSION, applied=now(), description="created"))
        return
    for version, description, fn in MIGRATIONS:
        if current < version <= SCHEMA_VERSION:
            fn(c)
            c.execute(schema_version.insert().values(
                version=version, applied=now(), description=description))
