"""Two runs side by side, series by series, like `asv compare` or `pyperf compare_to`.

A "faster"/"slower" verdict uses the regression rule of bench/regress.py and nothing else:
run A stands in as the history of run B (slower) and B as the history of A (faster), so the
same Mann-Whitney test, 5% threshold and round-to-round noise gate decide in both
directions. A change of at least the threshold that the rule does not back is "noise";
anything smaller is "no change". Device accuracy (top-1, agreement with FP32) on the same
evaluation set uses the accuracy rule, paired sample by sample where both runs stored hits.

The 95% CI of a run's p50 (the median over its rounds) comes from the rounds when there are
two or more: a t-interval of log(round p50), because each round is a fresh process whose
memory layout and clocks shift all its samples together, which a per-round CI cannot see
(regress.py's docstring). With one round it is the CI the device stored (`ci95_p50`, a
bootstrap), else a bootstrap of the stored samples; `source` says which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from . import regress
from .evidence import paired

ACCURACY = {"top1": "top1", "agreement": "agreement_fp32"}     # metric -> column / hits name
Key = tuple[str, str, str, str]                               # model, variant, device, runtime


@dataclass(frozen=True)
class CI:
    lo: float
    hi: float
    source: str          # "rounds", "stored" or "samples"


@dataclass
class Side:
    """One run's measurement of one series: its rounds' rows, not failed."""

    rows: list

    @property
    def rounds(self) -> list[float]:
        """Each round's p50 (a single row pooled by the runner keeps its rounds' p50s)."""
        vals = [r["p50_ms"] for r in self.rows if r["p50_ms"] is not None]
        pooled = ((self.rows[0].get("rounds") or {}).get("p50_ms") or []) if self.rows else []
        return [float(v) for v in pooled] if len(vals) == 1 and len(pooled) > 1 else vals

    @property
    def p50(self) -> float | None:
        r = self.rounds
        return float(np.median(r)) if r else None

    @property
    def samples(self) -> list[float]:
        return [s for r in self.rows for s in (r["samples_ms"] or [])]

    @property
    def ci(self) -> CI | None:
        return ci95(self.rounds, [(r.get("latency") or {}).get("ci95_p50") for r in self.rows],
                    self.samples)

    def accuracy(self, metric: str) -> dict | None:
        """The first round's accuracy figures that hold `metric` (deterministic per run)."""
        col = ACCURACY[metric]
        row = next((r for r in self.rows if r.get(col) is not None), None)
        return None if row is None else {**(row.get("accuracy") or {}), "value": row[col]}


def ci95(rounds: list[float], stored: list, samples: list[float]) -> CI | None:
    """The 95% CI of a run's p50 (module docstring: rounds, else stored, else samples)."""
    from scipy.stats import t

    logs = np.log([v for v in rounds if v and v > 0])
    if len(logs) >= 2:
        half = float(t.ppf(0.975, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs)))
        mid = float(np.median(logs))
        return CI(math.exp(mid - half), math.exp(mid + half), "rounds")
    given = [c for c in stored if c and len(c) == 2]
    if len(given) == 1:
        return CI(float(given[0][0]), float(given[0][1]), "stored")
    if samples:
        from hilq.stats import Stats

        lo, hi = Stats(samples).ci95_p50
        return CI(lo, hi, "samples")
    return None


@dataclass
class AccuracyDiff:
    metric: str
    a: float
    b: float
    verdict: str         # "higher", "lower", "no change", or why there is none
    note: str


@dataclass
class Row:
    """One series in both runs."""

    key: Key
    a: float
    b: float
    ci_a: CI | None
    ci_b: CI | None
    verdict: str         # "faster", "slower", "noise", "no change"
    p_value: float | None
    note: str
    accuracy: list = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.b / self.a if self.a else math.inf

    @property
    def label(self) -> str:
        return f"{self.key[0]} {self.key[1]} on {self.key[2]}/{self.key[3]}"

    def to_dict(self) -> dict:
        return {**asdict(self), "key": dict(zip(("model", "variant", "device", "runtime"),
                                                self.key)), "ratio": self.ratio}


@dataclass
class Comparison:
    run_a: str
    run_b: str
    rows: list           # [Row], sorted by ratio, slowest first
    only_a: list         # keys measured only in A
    only_b: list

    @property
    def slower(self) -> list:
        return [r for r in self.rows if r.verdict == "slower"]

    def to_dict(self) -> dict:
        return {"run_a": self.run_a, "run_b": self.run_b,
                "rows": [r.to_dict() for r in self.rows],
                "only_a": [list(k) for k in self.only_a], "only_b": [list(k) for k in self.only_b],
                "slower": len(self.slower)}


def resolve(store, run: str) -> str:
    """A run id, `latest`, or `previous` (the run before the latest)."""
    from .store import StoreError

    if run == "previous":
        ids = [r["id"] for r in store.runs(limit=2)]
        if len(ids) < 2:
            raise StoreError(f"no previous run in {store.name}: it holds {len(ids)} run(s)")
        return ids[1]
    return store.resolve_run(run)


def series(store, run_id: str) -> dict[Key, Side]:
    """The run's bench series with a p50, failed rounds left out."""
    out: dict[Key, Side] = {}
    for r in store.measurements(run_id, kind="bench"):
        if r["status"] != "failed":
            key = (r["model"], r["variant"], r["device"], r["runtime"])
            out.setdefault(key, Side([])).rows.append(r)
    return {k: s for k, s in out.items() if s.p50 is not None}


def compare_runs(store, run_a: str, run_b: str) -> Comparison:
    """Every series measured in both runs (ids already resolved)."""
    a, b = series(store, run_a), series(store, run_b)
    rows = [compare_series(k, a[k], b[k]) for k in a if k in b]
    rows.sort(key=lambda r: -r.ratio)
    return Comparison(run_a, run_b, rows, [k for k in a if k not in b],
                      [k for k in b if k not in a])


def compare_series(key: Key, a: Side, b: Side) -> Row:
    """regress.compare in both directions (module docstring). The raw samples feed its
    Mann-Whitney test as they do in the nightly; without them, the rounds' p50s do."""
    sa, sb = (a.samples, b.samples) if a.samples and b.samples else (a.rounds, b.rounds)
    slower = regress.compare([a.p50], b.p50, history_samples=sa, current_samples=sb,
                             history_rounds=[a.rounds], current_rounds=b.rounds)
    faster = regress.compare([b.p50], a.p50, history_samples=sb, current_samples=sa,
                             history_rounds=[b.rounds], current_rounds=a.rounds)
    mine = slower if b.p50 >= a.p50 else faster
    if slower.flagged or faster.flagged:
        verdict = "slower" if slower.flagged else "faster"
    elif mine.change is not None and mine.change >= regress.THRESHOLD:
        verdict = "noise"
    else:
        verdict = "no change"
    note = mine.note.replace("worse", "slower" if mine is slower else "faster").replace(
        "no regression", "no significant change")
    return Row(key, a.p50, b.p50, a.ci, b.ci, verdict, mine.p_value, note,
               [d for m in ACCURACY if (d := compare_accuracy(m, a, b)) is not None])


def compare_accuracy(metric: str, a: Side, b: Side) -> AccuracyDiff | None:
    """The accuracy rule of regress.py both ways, on the same evaluation set only."""
    fa, fb = a.accuracy(metric), b.accuracy(metric)
    if fa is None or fb is None:
        return None
    if fa.get("eval_sha256") != fb.get("eval_sha256"):
        return AccuracyDiff(metric, fa["value"], fb["value"], "not comparable",
                            "different evaluation sets")
    hits = [(f.get("per_sample") or {}).get(ACCURACY[metric]) for f in (fa, fb)]
    n = fb.get("n") or fa.get("n")
    test = paired(hits[0], hits[1])
    lower = regress.compare_accuracy([fa["value"]], fb["value"], n, metric=metric, paired=test)
    higher = regress.compare_accuracy([fb["value"]], fa["value"], n, metric=metric,
                                      paired=paired(hits[1], hits[0]))
    verdict = "lower" if lower.flagged else "higher" if higher.flagged else "no change"
    note = f"{100 * (fb['value'] - fa['value']):+.2f} pt"
    if test is not None:
        note += f"; {test.says('first run', 'second run')}"
    return AccuracyDiff(metric, fa["value"], fb["value"], verdict, note)
