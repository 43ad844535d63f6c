"""Everything a report shows, read from the store once: the builders then never touch the
store, so each is a plain function of this data (and testable without one)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hilq.stats import Stats

TREND_RUNS = 30
MAX_TREND_PANELS = 12


@dataclass
class Result:
    """One (model, variant, device, runtime) of the run, its rounds pooled."""

    model: str
    variant: str
    device: str
    runtime: str
    rows: list

    @property
    def key(self) -> tuple:
        return (self.model, self.variant, self.device, self.runtime)

    @property
    def ok_rows(self) -> list:
        return [r for r in self.rows if r["status"] != "failed"]

    @property
    def status(self) -> str:
        statuses = {r["status"] for r in self.rows}
        for s in ("failed", "degraded"):
            if s in statuses:
                why = next(r["failure"] or r["reason"] for r in self.rows if r["status"] == s)
                return f"{s}: {why}" if why else s
        return "ok"

    @property
    def samples(self) -> np.ndarray:
        return np.asarray([x for r in self.ok_rows for x in (r["samples_ms"] or [])], float)

    def stat(self, name: str) -> float | None:
        s = self.samples
        if len(s) and name in ("p50", "p90", "p99", "mean", "std"):
            return getattr(Stats(s), name)               # devices/stats.py, as on the device
        vals = [r[f"{name}_ms"] for r in self.ok_rows if r.get(f"{name}_ms") is not None]
        return float(np.median(vals)) if vals else None

    @property
    def accuracy(self) -> dict:
        """The device's accuracy figures (the first round that measured them)."""
        return next((r["accuracy"] for r in self.ok_rows if r.get("accuracy")), {})

    def median_of(self, column: str) -> float | None:
        vals = [r[column] for r in self.ok_rows if r[column] is not None]
        return float(np.median(vals)) if vals else None

    @property
    def round_spread(self) -> float | None:
        """(max - min) / median of the per-round p50s: drift across alternating rounds."""
        p = [r["p50_ms"] for r in self.ok_rows if r["p50_ms"] is not None]
        if len(p) == 1:                   # rounds pooled into one row (runner): their own p50s
            p = [x for r in self.ok_rows for x in (r.get("rounds") or {}).get("p50_ms") or []]
        return (max(p) - min(p)) / float(np.median(p)) if len(p) > 1 else None

    def having(self, name: str) -> dict | None:
        """Its first round's `name` among the Measurement fields kept in the store's `extra`
        (memory, scenario)."""
        return next(((x.get("extra") or {}).get(name) for x in self.ok_rows
                     if (x.get("extra") or {}).get(name)), None)


@dataclass
class History:
    """The nightly trends: per series, its last runs up to this one (baseline resets
    ignored, so an intended change stays visible), the flagged regressions of every run,
    and each series' resets."""

    p50: dict = field(default_factory=dict)       # key -> history rows, ≥ 2 runs
    top1: dict = field(default_factory=dict)      # key -> history rows in %, ≥ 2 runs
    flagged: list = field(default_factory=list)
    resets: dict = field(default_factory=dict)    # key -> run ids


@dataclass
class RunData:
    run: dict                 # the run's row
    results: list             # [Result]
    acc: dict                 # (model, variant) -> simulated top-1 of the variant
    allocs: list              # allocation rows (searched configs, their iterations)
    regs: list                # regression verdicts of this run
    devs: list                # device rows measured in this run
    history: History

    @property
    def flagged(self) -> set[tuple]:
        """(model, variant, device, runtime) with a flagged verdict."""
        return {(g["model"], g["variant"], g["device"], g["runtime"]) for g in self.regs
                if g["flagged"]}


def results(rows: list[dict]) -> list[Result]:
    groups: dict[tuple, Result] = {}
    for r in rows:
        key = (r["model"], r["variant"], r["device"], r["runtime"])
        groups.setdefault(key, Result(*key, rows=[])).rows.append(r)
    return list(groups.values())


def load(store, run_id: str) -> RunData:
    """The run `run_id` (already resolved) and what the report needs around it."""
    rows = store.measurements(run_id)
    res = results([r for r in rows if r["kind"] == "bench"] or rows)
    dev_ids = {r["device_id"] for r in rows}
    return RunData(
        run=store.run(run_id), results=res,
        acc={(a["model"], a["variant"]): a["top1"] for a in store.rows("accuracy", run_id)},
        allocs=store.rows("allocations", run_id), regs=store.regressions(run_id),
        devs=[d for d in store.rows("devices") if d["id"] in dev_ids],
        history=_history(store, run_id, res))


def _history(store, run_id: str, res: list[Result]) -> History:
    """p50 per run for every series, and device top-1 per run on tonight's evaluation set."""
    keys = [r.key for r in res if r.stat("p50") is not None][:MAX_TREND_PANELS]
    p50 = {k: store.history(*k, "p50", TREND_RUNS, through_run=run_id, respect_resets=False)
           for k in keys}
    p50 = {k: h for k, h in p50.items() if len(h) > 1}
    if not p50:
        return History()
    acc = {r.key: r.accuracy for r in res if r.accuracy and r.accuracy.get("top1") is not None}
    top1 = {k: [{**e, "value": 100 * e["value"]} for e in store.history(
                *k, "top1", TREND_RUNS, through_run=run_id, respect_resets=False,
                eval_sha256=a.get("eval_sha256"))]
            for k, a in list(acc.items())[:MAX_TREND_PANELS]}
    return History(p50=p50, top1={k: h for k, h in top1.items() if len(h) > 1},
                   flagged=store.regressions(flagged_only=True),
                   resets={k: store.resets(*k) for k in p50})
