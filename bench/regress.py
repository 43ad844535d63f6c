"""Regression detection: is tonight worse than history, beyond noise and by enough to matter?

Per (model, variant, device, runtime, metric), tonight's measurement is compared with the
earlier runs in the store since the latest baseline reset (an intended change marked with
`hilq results mark-intended`), at most `lookback` of them. Two tests say whether a change is
real, and a relative threshold says whether it matters:

- Mann-Whitney U (one-sided, in the worse direction) on raw latency samples, tonight against
  the pooled samples of the baseline runs: significant when p < `alpha` (default 0.01).
- Lookback z-score, conbench's method: z = (tonight - mean(history)) / std(history) over the
  per-run values of the last N runs; significant when z >= `z_threshold` (default 5) in the
  worse direction. It needs no raw samples, so it also covers energy and throughput.

A verdict is **flagged when the relative change from the baseline (median of the history
values) is at least `threshold` (default 5%) in the worse direction AND at least one test is
significant AND the change stands out of the round-to-round noise.** The threshold is needed
because with thousands of samples any shift, however small, is significant; the tests are
needed because a noisy night can move 5% by chance.

The noise gate is needed because the samples of one round are not independent draws: each
round is a fresh process, and a process lands on its own memory layout, clock and cache
state, which shifts all its samples together. Mann-Whitney on pooled samples cannot see that
and calls such a shift significant (a 0.06 ms model read +15% on an unchanged night). So
the per-round values are the independent observations: σ is the pooled within-run spread of
log(round value) over the history and tonight, and the worse log-change must reach
`noise_k` (default 3) standard errors, σ·√(1/k + 1/m) for k rounds tonight and m in the
history. It needs two runs' worth of round spread (two degrees of freedom) and is skipped
with fewer; for a steady model (σ ≈ 0.2%) it never binds and the 5% threshold decides.

Accuracy measured on the device (`top1`, `agreement` with FP32) has its own rule: the
evaluation set is fixed (compared only with history on the same sha256), so tonight and the
last night are paired sample by sample (`bench.evidence`): a drop of at least
`accuracy_threshold` (default 0.5 points) and at least one sample of the set is flagged only
where the exact McNemar test on the samples that changed gives p < 0.05; a set too small to
tell says so in the note instead of a red line. Runs stored without per-sample results keep
the threshold alone. Its minimum detectable effect is that drop, in points.

Every verdict carries its **minimum detectable effect** (`mde`): the smallest slowdown this
rule flags with ≥95% probability given the series' round noise σ, tonight's k rounds and the
history's m. On the log scale tonight's change is seen with standard error s = σ·√(1/k + 1/m);
it is flagged once it clears both the threshold and noise_k·s, so 95% of the time when the
true change is max(log(1 + threshold), noise_k·s) + 1.645·s. It never falls below the
threshold, and it falls with more rounds: `rounds_for` says how many a target needs, which
the nightly's adaptive rounds (`detect = 0.10`) use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

THRESHOLD = 0.05
ALPHA = 0.01
Z_THRESHOLD = 5.0
LOOKBACK = 14
MIN_Z_HISTORY = 3                    # runs needed before a std means anything
NOISE_K = 3.0                        # standard errors of round-to-round noise a change must reach
MIN_NOISE_DF = 2                     # degrees of freedom before the round spread is trusted
POWER_Z = 1.645                      # one-sided 95%: the probability a true change is flagged
SAMPLE_METRICS = frozenset({"p50", "mean"})   # metrics the raw-sample test speaks for
DEFAULT_METRICS = ("p50", "energy_j")
ACCURACY_METRICS = ("top1", "agreement")
ACCURACY_THRESHOLD = 0.005           # fraction: 0.5 points of top-1 or agreement


@dataclass(frozen=True)
class Verdict:
    """One comparison; `change` is current / baseline - 1 (positive = larger number)."""

    metric: str
    baseline: float | None
    current: float | None
    change: float | None
    p_value: float | None
    z: float | None
    n_history: int
    flagged: bool
    method: str
    note: str
    mde: float | None = None     # smallest slowdown flagged with ≥95% probability (module doc)

    def to_dict(self) -> dict:
        return asdict(self)


def relative_change(baseline: float, current: float) -> float | None:
    if baseline is None or current is None or baseline == 0:
        return None
    return current / baseline - 1.0


def mann_whitney_p(baseline: Sequence[float], current: Sequence[float],
                   higher_is_better: bool = False) -> float | None:
    """One-sided p-value that `current` is worse (larger, or smaller if higher is better)."""
    from scipy.stats import mannwhitneyu

    if len(baseline) == 0 or len(current) == 0:
        return None
    alternative = "less" if higher_is_better else "greater"
    res = mannwhitneyu(np.asarray(current, float), np.asarray(baseline, float),
                       alternative=alternative, method="asymptotic")
    return float(res.pvalue)


def lookback_z(history: Sequence[float], current: float) -> float | None:
    """conbench's z-score of tonight's value against the last N runs' values; None when the
    history is too short or has no spread."""
    if len(history) < MIN_Z_HISTORY or current is None:
        return None
    h = np.asarray(history, float)
    sd = float(h.std(ddof=1))
    if sd == 0 or not math.isfinite(sd):
        return None
    return (current - float(h.mean())) / sd


def round_noise(groups: Sequence[Sequence[float]]) -> float | None:
    """Pooled standard deviation of log(value) within each group of rounds (one group per
    run): the process-to-process noise, in relative terms. None below MIN_NOISE_DF."""
    ss, df = 0.0, 0
    for g in groups:
        logs = np.log([v for v in g if v is not None and v > 0])
        if len(logs) >= 2:
            ss += float(((logs - logs.mean()) ** 2).sum())
            df += len(logs) - 1
    return math.sqrt(ss / df) if df >= MIN_NOISE_DF else None


def minimum_detectable_effect(sigma: float | None, k: int, m: int, *,
                              threshold: float = THRESHOLD, noise_k: float = NOISE_K,
                              z_power: float = POWER_Z) -> float | None:
    """The smallest relative slowdown flagged with ≥95% probability (see the module
    docstring) for round noise `sigma` (log scale), k rounds tonight, m in the history."""
    if sigma is None or k < 1 or m < 1:
        return None
    s = sigma * math.sqrt(1 / k + 1 / m)
    return math.expm1(max(math.log1p(threshold), noise_k * s) + z_power * s)


def rounds_for(sigma: float | None, m: int, target: float, *, threshold: float = THRESHOLD,
               noise_k: float = NOISE_K, max_rounds: int = 64) -> int | None:
    """The fewest rounds tonight whose minimum detectable effect is ≤ `target` against a
    history of m rounds; None if no count up to `max_rounds` reaches it."""
    for k in range(1, max_rounds + 1):
        mde = minimum_detectable_effect(sigma, k, m, threshold=threshold, noise_k=noise_k)
        if mde is not None and mde <= target:
            return k
    return None


def compare(history_values: Sequence[float], current: float | None, *,
            history_samples: Sequence[float] = (), current_samples: Sequence[float] = (),
            history_rounds: Sequence[Sequence[float]] = (), current_rounds: Sequence[float] = (),
            metric: str = "p50", higher_is_better: bool = False,
            threshold: float = THRESHOLD, alpha: float = ALPHA,
            z_threshold: float = Z_THRESHOLD, noise_k: float = NOISE_K) -> Verdict:
    """Apply the rule in this module's docstring to plain numbers; `*_rounds` are the
    per-round values (per history run, and tonight's) that the noise gate needs."""
    n = len(history_values)
    if current is None or n == 0:
        return Verdict(metric, None, current, None, None, None, n, False, "",
                       "no history" if current is not None else "no current value")
    baseline = float(np.median(np.asarray(history_values, float)))
    change = relative_change(baseline, current)
    worse = None if change is None else (-change if higher_is_better else change)
    p = (mann_whitney_p(history_samples, current_samples, higher_is_better)
         if metric in SAMPLE_METRICS else None)
    z = lookback_z(history_values, current)
    z_worse = None if z is None else (-z if higher_is_better else z)
    tests = [name for name, v in (("mwu", p), ("zscore", z)) if v is not None]
    significant = [name for name, ok in (("mwu", p is not None and p < alpha),
                                         ("zscore", z_worse is not None
                                          and z_worse >= z_threshold)) if ok]
    big = worse is not None and worse >= threshold
    sigma = round_noise([*history_rounds, current_rounds])
    need = None
    if sigma is not None and current_rounds and history_rounds:
        k, m = len(current_rounds), sum(len(g) for g in history_rounds)
        need = math.expm1(noise_k * sigma * math.sqrt(1 / k + 1 / m))
        tests.append("rounds")
    in_noise = need is not None and worse is not None and worse < need
    mde = minimum_detectable_effect(sigma, len(current_rounds),
                                    sum(len(g) for g in history_rounds),
                                    threshold=threshold, noise_k=noise_k)
    flagged = big and bool(significant) and not in_noise
    if not tests:
        note = "too little history for a test"
    elif flagged:
        note = f"worse by {worse:.1%} ({'+'.join(significant)} significant)"
    elif big and significant and in_noise:
        note = (f"worse by {worse:.1%} but within round-to-round noise "
                f"(σ {sigma:.1%}; needs {need:.1%})")
    elif big:
        note = f"worse by {worse:.1%} but not significant"
    elif significant and worse is not None and worse > 0:
        note = f"significant but only {worse:.1%} worse (threshold {threshold:.0%})"
    else:
        note = "no regression"
    return Verdict(metric, baseline, float(current), change, p, z, n, flagged,
                   "+".join(tests), note, mde)


def compare_accuracy(history_values: Sequence[float], current: float | None, n: int | None, *,
                     metric: str = "top1", threshold: float = ACCURACY_THRESHOLD,
                     paired=None) -> Verdict:
    """The accuracy rule of the module docstring; `n`: samples in the evaluation set.
    `change` is relative like latency's; the note and `mde` speak in points. `paired`
    (`bench.evidence.Paired`, the last night against tonight on the same samples): the
    drop is flagged only where that exact test sees it, and the note carries its p-value."""
    h = len(history_values)
    if current is None or h == 0:
        return Verdict(metric, None, current, None, None, None, h, False, "",
                       "no history" if current is not None else "no current value")
    baseline = float(np.median(np.asarray(history_values, float)))
    drop = baseline - float(current)
    need = max(threshold, 1.0 / n if n else 0.0)
    flagged = drop >= need - 1e-12
    note = (f"{metric} dropped {100 * drop:.2f} pt on the device (threshold "
            f"{100 * need:.2f} pt)" if flagged else
            f"{metric} {'dropped' if drop > 0 else 'changed'} {100 * abs(drop):.2f} pt, "
            f"under {100 * need:.2f} pt" if drop != 0 else "no regression")
    if paired is not None and drop > 0:
        flagged = flagged and paired.significant
        note += f"; {paired.says('last night', 'tonight')}"
    return Verdict(metric, baseline, float(current), relative_change(baseline, current),
                   paired.p if paired is not None else None, None, h, flagged,
                   "points" if paired is None else "points, exact McNemar", note, need)


def _current(rows: list[dict], metric: str) -> tuple[float | None, list[float]]:
    """Median over tonight's rounds of the metric, and all rounds' raw samples."""
    from hilq.bench.store import METRICS

    vals = sorted(r[METRICS[metric]] for r in rows if r[METRICS[metric]] is not None)
    samples = [s for r in rows for s in (r["samples_ms"] or [])]
    return (float(np.median(vals)) if vals else None), samples


def _accuracy_verdicts(store, run_id: str, key: tuple, rows: list[dict], lookback: int
                       ) -> list[dict]:
    """Device top-1 / agreement, the outputs' task figures (map IoU, mAP, CTC agreement) and
    the user's metric, of one series tonight against its history on the same evaluation set
    (the first round that measured it: the figures are deterministic), each higher-better."""
    from hilq.bench.store import METRICS

    out = []
    row = next((r for r in rows if r.get("eval_sha256")), None)
    if row is None:
        return out
    acc = row.get("accuracy") or {}
    n = acc.get("n")
    figures = [f"{group}:{name}" for group in ("task", "metric")
               for name, v in (acc.get(group) or {}).items() if isinstance(v, int | float)]
    for metric in (*ACCURACY_METRICS, *figures):
        current = (row[METRICS[metric]] if metric in METRICS
                   else acc[metric.split(":")[0]][metric.split(":", 1)[1]])
        if current is None:
            continue
        hist = store.history(*key, metric, lookback, before_run=run_id,
                             eval_sha256=row["eval_sha256"])
        v = compare_accuracy([h["value"] for h in hist], current, n, metric=metric,
                             paired=_paired_with_last(store, hist, key, row, metric))
        out.append(dict(zip(("model", "variant", "device", "runtime"), key), **v.to_dict()))
    return out


def _paired_with_last(store, hist: list[dict], key: tuple, row: dict, metric: str):
    """Tonight's per-sample hits against the last night's on the same evaluation set
    (`bench.evidence.paired`); None where either has none stored (older runs)."""
    from .evidence import paired

    name = {"top1": "top1", "agreement": "agreement_fp32"}.get(metric)
    if name is None or not hist:
        return None
    tonight = ((row.get("accuracy") or {}).get("per_sample") or {}).get(name)
    last = next((r for r in store.rows("measurements", hist[-1]["run_id"])
                 if (r["model"], r["variant"], r["device"], r["runtime"]) == tuple(key)
                 and r.get("eval_sha256") == row["eval_sha256"] and r.get("accuracy")), None)
    before = ((last or {}).get("accuracy") or {}).get("per_sample", {}).get(name) \
        if last else None
    return paired(before, tonight)


def detect(store, run_id: str, *, metrics: Sequence[str] = DEFAULT_METRICS,
           threshold: float = THRESHOLD, alpha: float = ALPHA,
           z_threshold: float = Z_THRESHOLD, lookback: int = LOOKBACK) -> list[dict]:
    """Compare every bench measurement of `run_id` with its history and store the verdicts
    (replacing earlier ones for the run, so re-running after a mark-intended is safe).
    Returns the rows written; `[r for r in rows if r["flagged"]]` are the regressions."""
    from hilq.bench.store import HIGHER_IS_BETTER, METRICS

    groups: dict[tuple, list[dict]] = {}
    for r in store.measurements(run_id, kind="bench"):
        if r["status"] != "failed":
            groups.setdefault((r["model"], r["variant"], r["device"], r["runtime"]), []).append(r)
    out = []
    for key, rows in groups.items():
        for metric in metrics:
            current, samples = _current(rows, metric)
            if current is None:
                continue
            rounds = [r[METRICS[metric]] for r in rows if r[METRICS[metric]] is not None]
            hist = store.history(*key, metric, lookback, before_run=run_id,
                                 samples=metric in SAMPLE_METRICS)
            v = compare([h["value"] for h in hist], current,
                        history_samples=[s for h in hist for s in h.get("samples", [])],
                        current_samples=samples, history_rounds=[h["rounds"] for h in hist],
                        current_rounds=rounds, metric=metric,
                        higher_is_better=metric in HIGHER_IS_BETTER, threshold=threshold,
                        alpha=alpha, z_threshold=z_threshold)
            if any(r["busy"] for r in rows):
                v = replace(v, note=f"{v.note}; measured on a busy machine")
            out.append(dict(zip(("model", "variant", "device", "runtime"), key),
                            **v.to_dict()))
        out += _accuracy_verdicts(store, run_id, key, rows, lookback)
    store.replace_regressions(run_id, out)
    return out
