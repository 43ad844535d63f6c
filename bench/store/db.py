"""The store itself: one database behind `Store`, opened (created or migrated) by
`open_store`. Runs, measurements, cost tables, allocations, accuracy, history and regression
verdicts are read and written here; what a column holds is said in schema.py and
rows.py."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Table

from hilq.measurement import Measurement

from .connection import (
    Connections,
    StoreError,
    create_engine,
    decode,
    dumps,
    insert_ignore,
    now,
    redact,
    resolve_url,
)
from .provenance import config_hash, device_id, git_sha, hilq_version, library_versions, variant_id
from .rows import Key, as_float, as_int, from_row, key_of, to_row
from .schema import (
    METRICS,
    RUN_STATUSES,
    allocations,
    baseline_resets,
    cost_tables,
    devices,
    measurements,
    meta,
    migrate,
    regressions,
    runs,
    schema_version,
    variants,
)
from .schema import accuracy as accuracy_table

RESUME_WITHIN_H = 12.0      # an unfinished run older than this is not resumed by a new one


class Store:
    """One database. Methods that write open a transaction, or join the one already open in
    this thread (`with store.transaction():` around several calls makes them one unit)."""

    def __init__(self, url: str):
        self.url = url
        self.name = redact(url)           # for messages: no password
        self.engine = create_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._conns = Connections(self.engine)
        with self.transaction() as c:
            migrate(c, self.name)

    # ---------------------------------------------------------------- connections
    def transaction(self):
        """Commit on success, roll back everything on an exception; nested calls join."""
        return self._conns.transaction()

    def _read(self):
        return self._conns.read()

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
                hilq_version=hilq_version(), versions=dumps(library_versions()), seed=seed))
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
        return decode(dict(row)) if row else None

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
    def add_measurement(self, run_id: str, m: Measurement, *, kind: str = "bench",
                        round: int = 0, bit_config=None) -> bool:
        """Store one `Measurement`, all of it (rows.py says where each field goes). Returns
        False, changing nothing, when its key is already stored."""
        key = dict(run_id=run_id, model=m.model, variant=m.variant, device=m.device,
                   runtime=m.runtime, kind=kind, round=round)
        with self.transaction() as c:
            if c.execute(sa.select(measurements.c.id).where(
                    *[measurements.c[k] == v for k, v in key.items()])).first():
                return False
            did = self._ensure_device(c, m.device, m.facts)
            vid = self._ensure_variant(c, m.model, m.variant, m.artifact_sha256, bit_config)
            return insert_ignore(c, measurements, {**to_row(m), **key, "device_id": did,
                                                   "variant_id": vid, "created": now()})

    def _ensure_device(self, c: sa.Connection, name: str, facts: dict) -> str:
        did = device_id(name, facts)
        insert_ignore(c, devices, dict(id=did, name=name, facts=dumps(facts or {}),
                                        first_seen=now()))
        return did

    def _ensure_variant(self, c, model, name, artifact_sha256, bit_config) -> str:
        vid = variant_id(model, name, artifact_sha256, bit_config)
        insert_ignore(c, variants, dict(id=vid, model=model, name=name,
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
            return [decode(dict(r)) for r in c.execute(q).mappings()]

    def load_measurements(self, run_id: str, *, kind: str | None = None
                          ) -> dict[Key, Measurement]:
        """The `Measurement`s of one run, each whole (facts from its device), by natural key
        (model, variant, device, runtime, kind, round), in the order they were stored."""
        m, d = measurements.c, devices.c
        q = (sa.select(measurements, d.facts.label("device_facts"))
             .join_from(measurements, devices, m.device_id == d.id, isouter=True)
             .where(m.run_id == run_id).order_by(m.id))
        if kind is not None:
            q = q.where(m.kind == kind)
        with self._read() as c:
            rows = [decode(dict(r)) for r in c.execute(q).mappings()]
        return {key_of(r): from_row(r, json.loads(r["device_facts"] or "{}")) for r in rows}

    # ---------------------------------------------------------------- search & accuracy
    def add_accuracy(self, run_id: str, model: str, variant: str, top1: float, n: int,
                     dataset: str) -> bool:
        key = dict(run_id=run_id, model=model, variant=variant, dataset=dataset)
        return self._insert_once(accuracy_table, key, dict(top1=as_float(top1), n=as_int(n)))

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
                insert_ignore(c, cost_tables, row)
        return len(new)

    def add_allocation(self, run_id: str, model: str, device: str, runtime: str, name: str,
                       *, budgets: dict, config, predicted: dict, measured: dict | None = None,
                       accuracy: float | None = None, variant: str | None = None) -> bool:
        """One searched config: `config` is a BitConfig (or its dict), `predicted`/`measured`
        dicts such as {"latency_ms": .., "energy_mj": .., "size_bits": ..}."""
        key = dict(run_id=run_id, model=model, device=device, runtime=runtime, name=name)
        return self._insert_once(allocations, key, dict(
            variant=variant, budgets=dumps(budgets), config=dumps(config),
            predicted=dumps(predicted), measured=dumps(measured), accuracy=as_float(accuracy)))

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
            return insert_ignore(c, table, {**key, **values})

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
        evaluation set (accuracy on another set is not comparable). `metric` may name a
        figure inside the stored accuracy (`json_figure`): `task:map_iou`, `metric:NAME`."""
        figure = json_figure(metric)
        col = measurements.c.accuracy if figure else measurements.c[METRICS[metric]]
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
            if figure:
                value = (json.loads(value).get(figure[0]) or {}).get(figure[1])
                if value is None:
                    continue
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

    def profiles(self, model: str, device: str, runtime: str) -> list[dict]:
        """The engine profiles of `model` on (device, runtime): run_id, variant, bit_config
        and profile (`devices.agent.profile_summary`), oldest first: with
        `config_latencies`, what a latency model is fitted from (`hilq search --replay`, bench/replay.py)."""
        m, v, r = measurements.c, variants.c, runs.c
        q = (sa.select(m.run_id, m.variant, m.extra, v.bit_config)
             .join_from(measurements, variants, m.variant_id == v.id)
             .join(runs, m.run_id == r.id)
             .where(m.model == model, m.device == device, m.runtime == runtime,
                    m.status != "failed", m.kind == "profile")
             .order_by(r.started, m.id))
        with self._read() as c:
            rows = [dict(x) for x in c.execute(q).mappings()]
        out = []
        for row in rows:
            extra = row.pop("extra") or {}
            extra = json.loads(extra) if isinstance(extra, str) else extra
            if extra.get("profile"):
                bc = row["bit_config"]
                out.append({**row, "bit_config": json.loads(bc) if isinstance(bc, str) else bc,
                            "profile": extra["profile"]})
        return out

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
            return [decode(dict(r)) for r in c.execute(q).mappings()]


@contextmanager
def _given(conn):
    yield conn


def _median(vals: list[float]) -> float:
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


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
        raise StoreError(f"cannot open store {redact(url)}: {why}") from None


def json_figure(metric: str) -> tuple[str, str] | None:
    """`task:NAME` / `metric:NAME` -> (the accuracy dict's group, NAME): the task figures of
    an output's kind and a user's metric, stored in the accuracy JSON rather than a column."""
    group, sep, name = metric.partition(":")
    return (group, name) if sep and group in ("task", "metric") and name else None
