"""The results store on real SQLite files: transactions, idempotent resume, migrations,
integrity, export and the pandas loader."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from hilq.bench import store as st
from hilq.bench.store import load_frame, open_store

from hilq.measurement import Measurement

FACTS = {"cpu": "Synthetic CPU @ 3GHz", "flags": ["avx2", "avx512_vnni"], "os": "Linux",
         "onnxruntime": "1.32.0", "load": 0.3}


def measurement(variant="fp32", median=20.0, n=50, seed=0, device="local", **kw) -> Measurement:
    rng = np.random.default_rng(seed)
    samples = (median * rng.lognormal(0.0, 0.05, n)).round(4).tolist()
    a = np.asarray(samples)
    lat = {"p50": float(np.median(a)), "p90": float(np.percentile(a, 90)),
           "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "std": float(a.std()),
           "min": float(a.min()), "max": float(a.max()), "n": n}
    return Measurement("resnet18", variant, device, "onnxruntime", latency_ms=lat,
                       samples_ms=samples, throughput=1000 / lat["mean"],
                       energy_j_per_inference=0.02, power={"avg_w": 1.0, "meter": "rapl"},
                       facts=dict(FACTS), protocol={"min_iters": n}, load={"busy": False},
                       artifact_sha256="ab" * 32, **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """A store URL: a real SQLite file, or a fresh database on a real PostgreSQL server."""
    if request.param == "sqlite":
        yield str(tmp_path / "hilq.sqlite")
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def store(backend):
    s = open_store(backend)
    yield s
    s.close()


def count(store, table) -> int:
    with store.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(st.meta.tables[table])).scalar()


def test_default_path_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HILQ_DB", raising=False)
    assert st.resolve_url(None).endswith(str(tmp_path / "results" / "hilq.sqlite"))
    monkeypatch.setenv("HILQ_DB", str(tmp_path / "other.db"))
    assert st.resolve_url(None).endswith("other.db")
    assert st.resolve_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert st.resolve_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert st.resolve_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"


def test_pragmas_and_schema(tmp_path):
    store = open_store(tmp_path / "hilq.sqlite")
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert store.schema_version() == st.SCHEMA_VERSION
    assert set(st.TABLES) <= set(sa.inspect(store.engine).get_table_names())
    store.close()


def test_run_records_provenance_and_resumes(store):
    cfg = {"model": "resnet18", "variants": ["fp32", "w8a8"]}
    run = store.begin_run(cfg, seed=7)
    row = store.run(run)
    assert row["status"] == "running" and row["config_hash"] == st.config_hash(cfg)
    assert run.endswith(row["config_hash"][:8]) and row["seed"] == 7
    assert "python" in row["versions"] and row["config"] == cfg
    # a crashed run with the same config is resumed under the same id; a finished one is not
    assert store.begin_run(dict(reversed(cfg.items()))) == run
    store.finish_run(run, "ok")
    assert store.run(run)["ended"] and store.run(run)["status"] == "ok"
    assert store.begin_run(cfg) != run
    assert store.begin_run(cfg, run_id=run) == run          # explicit id: reopened
    # an unfinished run from last night is not tonight's: marked interrupted, new id
    assert store.begin_run(cfg, resume_within_h=0) != run
    assert store.run(run)["status"] == "interrupted"
    with pytest.raises(st.StoreError):
        store.begin_run({"other": 1}, run_id=run)


def test_measurement_round_trip_and_idempotent_reinsert(store):
    run = store.begin_run({"c": 1})
    m = measurement()
    assert store.add_measurement(run, m, round=0)
    assert not store.add_measurement(run, m, round=0)        # same key: no-op
    assert store.add_measurement(run, measurement(seed=1), round=1)
    assert store.add_measurement(run, measurement("w8a8", 9.0), round=0)
    assert count(store, "measurements") == 3
    assert count(store, "devices") == 1 and count(store, "variants") == 2
    rows = store.measurements(run)
    assert rows[0]["samples_ms"] == m.samples_ms and rows[0]["p50_ms"] == m.latency_ms["p50"]
    assert rows[0]["power"]["meter"] == "rapl" and rows[0]["energy_j"] == 0.02
    assert store.done_keys(run) == {("resnet18", "fp32", "local", "onnxruntime", "bench", 0),
                                    ("resnet18", "fp32", "local", "onnxruntime", "bench", 1),
                                    ("resnet18", "w8a8", "local", "onnxruntime", "bench", 0)}
    facts = store.rows("devices")[0]["facts"]
    assert facts["flags"] == FACTS["flags"]
    # volatile facts (load) do not make a new device; a different CPU does
    store.add_measurement(run, _with_facts(measurement(), load=0.9), round=2)
    assert count(store, "devices") == 1
    store.add_measurement(run, _with_facts(measurement(), cpu="Other CPU"), round=3)
    assert count(store, "devices") == 2


def test_every_measurement_field_comes_back_whole(store):
    """The field<->column map in both directions: a Measurement with every field set is read
    back equal, facts from its device row, whatever column or `extra` holds each field."""
    import dataclasses

    run = store.begin_run({"c": 1})
    m = measurement(reason="slow start", device_latency_ms={"p50": 19.0},
                    kernels={"integer": ["QLinearConv"], "float": []},
                    outputs_check={"max_abs": 0.01}, harness_overhead_ms=0.002,
                    timing={"wall_s": 2.5}, rounds={"p50s": [20.1, 19.9]},
                    profile={"layer_ms": {"conv1": 1.5}}, status="degraded",
                    accuracy={"top1": 0.98, "agreement_fp32": 0.99, "eval_sha256": "e" * 64},
                    scenario={"scenario": "server", "valid": False, "value": 41.0},
                    memory={"load_peak_mb": 310.5, "timed_peak_mb": 301.0})
    unset = {f.name for f in dataclasses.fields(m)
             if getattr(m, f.name) in (None, {}, []) and f.name != "failure"}
    assert not unset, f"give the test a value for {unset}"
    store.add_measurement(run, m, kind="bench", round=3)
    (key, back), = store.load_measurements(run).items()
    assert key == ("resnet18", "fp32", "local", "onnxruntime", "bench", 3) and key.round == 3
    assert back == m
    row = store.measurements(run)[0]                    # and the query columns say the same
    assert (row["top1"], row["scenario_valid"], row["scenario_value"]) == (0.98, False, 41.0)
    assert (row["load_peak_mb"], row["n_samples"], row["busy"]) == (310.5, 50, False)
    assert store.load_measurements(run, kind="profile") == {}


def _with_facts(m: Measurement, **facts) -> Measurement:
    m.facts = {**m.facts, **facts}
    return m


def test_failed_measurement_is_stored(store):
    run = store.begin_run({"c": 1})
    m = Measurement.failed("resnet18", "w4a4", "pi", "onnxruntime", "timeout", "agent timed out")
    assert store.add_measurement(run, m)
    assert store.done_keys(run, include_failed=False) == set()
    assert store.measurements(run)[0]["failure"] == "timeout"


def test_transaction_rolls_back_leaving_earlier_rows(store):
    run = store.begin_run({"c": 1})
    store.add_measurement(run, measurement(), round=0)
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_measurement(run, measurement("w8a8"), round=0)
            store.add_accuracy(run, "resnet18", "w8a8", 0.69, 1000, "imagenette")
            raise RuntimeError("killed half-way")
    assert count(store, "measurements") == 1 and count(store, "accuracy") == 0
    assert store.done_keys(run) == {("resnet18", "fp32", "local", "onnxruntime", "bench", 0)}


def test_resume_after_interrupted_writer_no_duplicates(tmp_path):
    """A writer that dies mid-run, then a rerun of the same config that skips done work."""
    path = tmp_path / "hilq.sqlite"
    cfg = {"nightly": True}
    work = [(v, r) for r in range(3) for v in ("fp32", "w8a8", "w4a8")]
    s = open_store(path)
    run = s.begin_run(cfg)
    for v, r in work[:4]:
        s.add_measurement(run, measurement(v, seed=r), round=r)
    s.engine.dispose()                                       # the process is gone
    s2 = open_store(path)
    assert s2.begin_run(cfg) == run
    done = s2.done_keys(run)
    for v, r in work:
        if ("resnet18", v, "local", "onnxruntime", "bench", r) not in done:
            s2.add_measurement(run, measurement(v, seed=r), round=r)
        s2.add_measurement(run, measurement(v, seed=r), round=r)  # a careless runner: still safe
    s2.finish_run(run)
    assert count(s2, "measurements") == len(work)
    assert s2.integrity_check() == "ok"
    with sqlite3.connect(path) as raw:                      # and from outside SQLAlchemy
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_search_tables_idempotent(store):
    run = store.begin_run({"c": 1})
    rows = [dict(model="resnet18", device="local", runtime="onnxruntime", layer=f"conv{i}",
                 precision=p, latency_ms=0.1 * i, energy_mj=None, size_bits=1e5, bops=1e8,
                 sensitivity=0.01, method="measured") for i in range(3) for p in ("w8a8", "w4a8")]
    assert store.add_cost_rows(run, rows) == 6
    assert store.add_cost_rows(run, rows) == 0
    with pytest.raises(ValueError):
        store.add_cost_rows(run, [{**rows[0], "bogus": 1}])
    assert store.add_allocation(run, "resnet18", "local", "onnxruntime", "lat<=5ms",
                                budgets={"latency_ms": 5}, config={"conv1": {"weight": None,
                                                                             "act": None}},
                                predicted={"latency_ms": 4.8})
    assert not store.add_allocation(run, "resnet18", "local", "onnxruntime", "lat<=5ms",
                                    budgets={}, config={}, predicted={})
    store.set_allocation_measured(run, "resnet18", "local", "onnxruntime", "lat<=5ms",
                                  {"latency_ms": 5.1}, accuracy=0.7)
    a = store.rows("allocations", run)[0]
    assert a["measured"] == {"latency_ms": 5.1} and a["accuracy"] == 0.7
    assert a["budgets"] == {"latency_ms": 5}


def test_foreign_keys_enforced(store):
    with pytest.raises(sa.exc.IntegrityError):
        store.add_accuracy("no-such-run", "m", "fp32", 0.5, 10, "d")


def _v1_database(path):
    """A store as this version writes it, before a pretend next version that adds a column."""
    s = open_store(path)
    run = s.begin_run({"c": 1})
    s.add_measurement(run, measurement())
    s.close()
    return run


def test_migration_from_older_version(backend, monkeypatch):
    run = _v1_database(backend)
    calls = []

    def add_note(conn):
        calls.append(1)
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN note TEXT"))

    nxt = st.SCHEMA_VERSION + 1
    monkeypatch.setattr(st.schema, "SCHEMA_VERSION", nxt)
    monkeypatch.setattr(st.schema, "MIGRATIONS", [(nxt, "runs.note", add_note)])
    s = open_store(backend)
    assert calls == [1] and s.schema_version() == nxt
    assert "note" in {c["name"] for c in sa.inspect(s.engine).get_columns("runs")}
    assert s.run(run) is not None and count(s, "measurements") == 1
    s.close()
    open_store(backend).close()                              # applied once only
    assert calls == [1]


def test_failed_migration_rolls_back(backend, monkeypatch):
    """DDL and the version row go in one transaction (SQLite and PostgreSQL both have
    transactional DDL): a migration that fails half-way leaves the old schema intact."""
    _v1_database(backend)

    def half(conn):
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN note TEXT"))
        raise RuntimeError("bug in migration")

    now = st.SCHEMA_VERSION
    monkeypatch.setattr(st.schema, "SCHEMA_VERSION", now + 1)
    monkeypatch.setattr(st.schema, "MIGRATIONS", [(now + 1, "runs.note", half)])
    with pytest.raises(RuntimeError):
        open_store(backend)
    monkeypatch.setattr(st.schema, "SCHEMA_VERSION", now)
    with open_store(backend) as s:
        assert "note" not in {c["name"] for c in sa.inspect(s.engine).get_columns("runs")}
        assert s.schema_version() == now


def test_a_version_1_store_gains_the_mde_column_and_keeps_its_data(backend):
    run = _v1_database(backend)
    engine = sa.create_engine(backend if "://" in str(backend) else f"sqlite:///{backend}")
    with engine.begin() as c:                       # make it what version 1 wrote
        c.execute(sa.text("ALTER TABLE regressions DROP COLUMN mde"))
        for col in ("accuracy", "top1", "agreement_fp32", "eval_sha256",    # version 3's
                    "load_peak_mb", "timed_peak_mb", "scenario", "scenario_valid",
                    "scenario_value"):                                       # version 4's
            c.execute(sa.text(f"ALTER TABLE measurements DROP COLUMN {col}"))
        c.execute(sa.text("UPDATE schema_version SET version = 1"))
    engine.dispose()
    with open_store(backend) as s:
        assert s.schema_version() == st.SCHEMA_VERSION
        assert "mde" in {c["name"] for c in sa.inspect(s.engine).get_columns("regressions")}
        assert {"accuracy", "top1", "eval_sha256"} <= {
            c["name"] for c in sa.inspect(s.engine).get_columns("measurements")}
        assert count(s, "measurements") == 1 and s.run(run) is not None


def test_newer_schema_refused(backend, monkeypatch):
    _v1_database(backend)
    monkeypatch.setattr(st.schema, "SCHEMA_VERSION", 0)
    with pytest.raises(st.StoreError, match="newer"):
        open_store(backend)


def test_export_and_loader(store, tmp_path):
    run = store.begin_run({"c": 1})
    for r in range(2):
        store.add_measurement(run, measurement(seed=r), round=r)
    store.add_accuracy(run, "resnet18", "fp32", 0.71, 500, "imagenette")
    df = load_frame(store)
    assert len(df) == 2 and {"p50_ms", "samples_ms", "run_id"} <= set(df.columns)
    dec = load_frame(store, "measurements", run_id=run, decode_json=True)
    assert isinstance(dec["samples_ms"].iloc[0], list)
    with pytest.raises(st.StoreError):
        load_frame(store, "nope")
    for fmt in ("csv", "parquet"):
        files = st.export(store, tmp_path / fmt, fmt)
        assert {f.name for f in files} == {f"{t}.{fmt}" for t in st.TABLES}
        read = pd.read_csv if fmt == "csv" else pd.read_parquet
        m = read(tmp_path / fmt / f"measurements.{fmt}")
        assert len(m) == 2 and m["p50_ms"].notna().all()
        assert read(tmp_path / fmt / f"accuracy.{fmt}")["top1"].iloc[0] == 0.71


def test_history_medians_and_resets(store):
    runs = []
    for night in range(5):
        run = store.begin_run({"night": night})
        for r in range(2):
            store.add_measurement(run, measurement(median=10.0 + night, seed=night * 10 + r),
                                  round=r)
        store.finish_run(run)
        runs.append(run)
    key = ("resnet18", "fp32", "local", "onnxruntime")
    h = store.history(*key, "p50", last_n=3, before_run=runs[-1], samples=True)
    assert [e["run_id"] for e in h] == runs[1:4]
    assert len(h[0]["samples"]) == 100 and 10.5 < h[0]["value"] < 11.5
    store.mark_intended(runs[2], *key, reason="new kernels")
    h = store.history(*key, "p50", before_run=runs[-1])
    assert [e["run_id"] for e in h] == runs[2:4]
    assert store.history(*key, "p50", before_run=runs[-1]) == h
    # a reset for another metric does not touch p50
    store.mark_intended(runs[3], *key, metric="energy_j")
    assert len(store.history(*key, "p50", before_run=runs[-1])) == 2
    assert len(store.history(*key, "energy_j", before_run=runs[-1])) == 1


WRITER = """
import sys
from hilq.bench.store import open_store
from test_store import measurement
s = open_store(sys.argv[1])
run = s.begin_run({"nightly": "kill"})
print(run, flush=True)
for r in range(10_000):
    for v in ("fp32", "w8a8"):
        s.add_measurement(run, measurement(v, seed=r), round=r)
"""


def test_kill_9_mid_run_then_resume(tmp_path):
    """SIGKILL a writer mid-run; the rerun resumes the same run id, the file is sound and
    finishing the work leaves exactly one row per key."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    path = tmp_path / "hilq.sqlite"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=root,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"})
    try:
        run = proc.stdout.readline().strip()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sqlite3.connect(path, timeout=30) as raw:
                if raw.execute("SELECT count(*) FROM measurements").fetchone()[0] >= 6:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    s = open_store(path)
    assert s.integrity_check() == "ok"
    assert s.begin_run({"nightly": "kill"}) == run
    done = s.done_keys(run)
    assert len(done) >= 6
    last = max(k[5] for k in done) + 2
    for r in range(last):
        for v in ("fp32", "w8a8"):
            if ("resnet18", v, "local", "onnxruntime", "bench", r) not in done:
                s.add_measurement(run, measurement(v, seed=r), round=r)
    s.finish_run(run)
    assert count(s, "measurements") == 2 * last
    assert s.integrity_check() == "ok"
    s.close()


def test_cli_results_runs_and_export(tmp_path, capsys):
    import json

    from hilq.bench.cli import main

    db = tmp_path / "hilq.sqlite"
    s = open_store(db)
    run = s.begin_run({"c": 1})
    s.add_measurement(run, measurement())
    s.finish_run(run)
    s.close()
    assert main(["results", "runs", "--db", str(db), "--json", str(tmp_path / "r.json")]) == 0
    assert run in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["id"] == run
    for fmt in ("csv", "parquet"):
        assert main(["results", "export", "--db", str(db), "--format", fmt,
                     "--out", str(tmp_path / fmt)]) == 0
        assert (tmp_path / fmt / f"measurements.{fmt}").is_file()
    assert main(["results", "export", "--db", str(db), "--out", str(tmp_path / "x"),
                 "--table", "nope"]) == 2
    assert "unknown table" in capsys.readouterr().err
    assert main(["results", "runs", "--db", "bogus://nowhere"]) == 2
    assert "cannot open store" in capsys.readouterr().err
    # an unreachable server (nothing listens on port 1): one line naming it, no traceback
    assert main(["results", "runs", "--db", "postgresql://hilq:secret@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot open store postgresql+psycopg://hilq:***@127.0.0.1:1/x" in err[0]


_RUN_FK = "FOREIGN KEY(run_id) REFERENCES runs (id)"
_SERIAL_ID = ("id SERIAL NOT NULL", "PRIMARY KEY (id)", "run_id VARCHAR(64) NOT NULL", _RUN_FK)
# What each table's PostgreSQL DDL must hold: its key, its foreign keys, its natural key.
PG_DDL = {
    "schema_version": ["version SERIAL NOT NULL", "PRIMARY KEY (version)"],
    "runs": ["id VARCHAR(64) NOT NULL", "PRIMARY KEY (id)", "status VARCHAR(16) NOT NULL",
             "config_hash VARCHAR(64) NOT NULL"],
    "devices": ["id VARCHAR(16) NOT NULL", "PRIMARY KEY (id)", "name VARCHAR(200) NOT NULL"],
    "variants": ["id VARCHAR(16) NOT NULL", "PRIMARY KEY (id)", "model VARCHAR(200) NOT NULL"],
    "measurements": [*_SERIAL_ID, "round INTEGER NOT NULL", "scenario_valid BOOLEAN",
                     "CONSTRAINT uq_measurement UNIQUE (run_id, model, variant, device, "
                     "runtime, kind, round)",
                     "FOREIGN KEY(device_id) REFERENCES devices (id)",
                     "FOREIGN KEY(variant_id) REFERENCES variants (id)"],
    "cost_tables": [*_SERIAL_ID, "CONSTRAINT uq_cost UNIQUE (run_id, model, device, runtime, "
                    "layer, precision)"],
    "allocations": [*_SERIAL_ID, "CONSTRAINT uq_allocation UNIQUE (run_id, model, device, "
                    "runtime, name)"],
    "accuracy": [*_SERIAL_ID, "CONSTRAINT uq_accuracy UNIQUE (run_id, model, variant, dataset)"],
    "regressions": [*_SERIAL_ID, "flagged BOOLEAN NOT NULL",
                    "CONSTRAINT uq_regression UNIQUE (run_id, model, variant, device, runtime, "
                    "metric)"],
    "baseline_resets": [*_SERIAL_ID],
}
RUN_INDEXED = ("measurements", "cost_tables", "allocations", "accuracy", "regressions")


def test_schema_compiles_for_postgresql():
    """The same tables and queries go to PostgreSQL; compile them without a server."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    d = postgresql.dialect()
    ddl = {t.name: " ".join(str(CreateTable(t).compile(dialect=d)).split())
           for t in st.meta.sorted_tables}
    indexes = {str(CreateIndex(i).compile(dialect=d))
               for t in st.meta.sorted_tables for i in t.indexes}
    assert set(ddl) == set(PG_DDL)
    for name, parts in PG_DDL.items():
        assert ddl[name].startswith(f"CREATE TABLE {name} ("), ddl[name]
        for part in parts:
            assert part in ddl[name], (name, part)
    for name, column in (("runs", "config_hash"), *((t, "run_id") for t in RUN_INDEXED)):
        assert f"CREATE INDEX ix_{name}_{column} ON {name} ({column})" in indexes


def test_newer_measurement_fields_are_kept(store):
    run = store.begin_run({"c": 1})
    m = measurement(timing={"wall_s": 2.5}, rounds={"spread": 0.01}, harness_overhead_ms=0.002)
    store.add_measurement(run, m)
    row = store.measurements(run)[0]
    assert row["timing"] == {"wall_s": 2.5} and row["rounds"] == {"spread": 0.01}
    assert row["harness_overhead_ms"] == 0.002
    assert row["extra"] is None          # each in its own column, none left for `extra`


def test_processes_opening_one_fresh_store_at_once_take_turns(backend):
    """A nightly and its Ray tasks may open a new database together: one creates the tables,
    the others find them (no duplicate-table error from a race)."""
    import threading

    go, errors = threading.Barrier(4), []

    def one():
        go.wait()
        try:
            open_store(backend).close()
        except Exception as e:  # noqa: BLE001 — collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with open_store(backend) as s:
        assert s.schema_version() == st.SCHEMA_VERSION
        assert [r["version"] for r in s.rows("schema_version")] == [st.SCHEMA_VERSION]


def test_two_writers_at_once(backend):
    """Two connections writing the same store concurrently, both registering the same device
    and variants first, neither fails: on SQLite they wait for each other (WAL, busy timeout,
    BEGIN IMMEDIATE), on PostgreSQL the loser of an insert race reuses the winner's row."""
    import threading

    path = backend
    run = open_store(path).begin_run({"shared": True})
    errors = []

    def writer(variant):
        s = open_store(path)
        try:
            for r in range(15):
                with s.transaction():
                    s.add_measurement(run, measurement(variant, seed=r), round=r)
                    s.add_accuracy(run, "resnet18", variant, 0.7, r + 1, f"set{r}")
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)
        finally:
            s.close()

    threads = [threading.Thread(target=writer, args=(v,)) for v in ("fp32", "w8a8")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = open_store(path)
    assert count(s, "measurements") == 30 and count(s, "accuracy") == 30
    assert count(s, "devices") == 1 and count(s, "variants") == 2
    assert s.integrity_check() in ("ok", "n/a")
    s.close()
