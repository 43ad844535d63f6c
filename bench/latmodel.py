"""A per-layer latency model fitted to every whole-network measurement, with uncertainty.

latency(config) = c + Σ_l d_l·[l float] + Σ_e (β + δ_e)·[precisions differ across edge e]

`d_l` is what layer l costs more in float than in INT8 (negative where float is faster),
β + δ_e what a precision boundary on the producer→consumer edge e costs (the Q or DQ node,
layout reorders), and `c` everything the all-INT8 network costs. The boundary cost is
shared (β) with a per-edge deviation (δ_e): a measured mix then teaches the model what a
boundary costs *anywhere*, not only on its own edges. With independent per-edge costs, each
re-measured pick corrected only the edges it used, and the next solve moved to edges still
at their prior: on a Zen 5 (AVX-512 VNNI), where ONNX Runtime ran ResNet-18 mixes of half
float layers as slowly as all-float and a float stem alone cost +2.1 ms over all-INT8, three
picks in a row missed a 25% budget by 16–40%. The engine's own profile
gives the prior (each layer's kernel time at each precision, and the Q/DQ time per
boundary), scaled to wall-clock time; every whole-network measurement of the model on that
device and runtime (uniform, switched, each re-measured pick, tonight's and history's) is
data. The fit is Bayesian linear regression: least squares on the measurements and the prior
stacked and whitened (scipy), so each prediction carries a standard deviation, and a
configuration far from anything measured is honestly uncertain. That uncertainty is what
keeps the ILP from buying its pick with noise (the winner's curse): the search budgets the
prediction plus a margin.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

FLOAT, INT8 = "fp32", "w8a8"
PRIOR_REL_SD = 0.3     # a profiled layer cost is trusted to about ±30% (profiler vs wall clock)
NOISE_FLOOR = 0.005    # relative noise below which no measurement is believed (0.5%)
SPEED_WITHIN = 0.15    # a batch's speed is applied when known to ±15% (95%): `on_one_scale`


@dataclass(frozen=True)
class Observation:
    """One whole-network latency: the configuration, its median over rounds, and the
    standard error of that median."""

    config: Mapping[str, str]
    latency_ms: float
    se_ms: float
    name: str = ""


@dataclass(frozen=True)
class Prior:
    mean: np.ndarray
    sd: np.ndarray
    source: str = "profile"


@dataclass
class LatencyModel:
    layers: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]
    theta: np.ndarray
    cov: np.ndarray
    prior: Prior
    observations: list[Observation] = field(default_factory=list)
    noise_scale: float = 1.0   # sqrt(χ²/n) of the measurements, ≥ 1: noise beyond the stated se

    def features(self, config: Mapping[str, str]) -> np.ndarray:
        return features(self.layers, self.edges, config)

    def predict(self, config: Mapping[str, str]) -> tuple[float, float]:
        """(mean, sd) of the latency of `config` in ms; sd is the model's uncertainty, not
        the noise of a future measurement."""
        x = self.features(config)
        return float(x @ self.theta), float(math.sqrt(max(0.0, x @ self.cov @ x)))

    @property
    def constant_ms(self) -> float:
        return float(self.theta[0])

    @property
    def layer_delta_ms(self) -> dict[str, float]:
        return {lay: float(v) for lay, v in zip(self.layers, self.theta[1:1 + len(self.layers)])}

    @property
    def boundary_common_ms(self) -> float:
        """β: what a precision boundary costs on any edge (the last parameter)."""
        return float(self.theta[-1])

    @property
    def boundary_ms(self) -> dict[tuple[str, str], float]:
        """β + δ_e per edge: what a boundary on that edge costs."""
        n = 1 + len(self.layers)
        return {e: self.boundary_common_ms + float(v)
                for e, v in zip(self.edges, self.theta[n:n + len(self.edges)])}

    def loo(self) -> list[dict]:
        """Leave-one-out: each observation predicted by the model fitted without it."""
        out = []
        for i, ob in enumerate(self.observations):
            rest = self.observations[:i] + self.observations[i + 1:]
            m = fit(self.layers, self.edges, self.prior, rest)
            mean, sd = m.predict(ob.config)
            out.append({"name": ob.name, "measured_ms": ob.latency_ms, "predicted_ms": mean,
                        "sd_ms": sd, "error": (mean - ob.latency_ms) / ob.latency_ms})
        return out

    def costs(self) -> tuple[dict[tuple[str, str], float], list[tuple[str, str, str, str, dict]]]:
        """The model as an ILP cost table on `latency_ms`: per-(layer, precision) values and
        float-float pair terms, such that CostTable.total(config) equals the mean prediction.
        A boundary costs b_e when exactly one end is float: b_e·(x_a + x_b − 2·x_a·x_b)."""
        n = len(self.layers)
        c, d = self.constant_ms, self.layer_delta_ms
        per = {lay: c / n for lay in self.layers}
        boundary = dict.fromkeys(self.layers, 0.0)
        for (a, b), v in self.boundary_ms.items():
            boundary[a] += v
            boundary[b] += v
        rows = {}
        for lay in self.layers:
            rows[(lay, INT8)] = per[lay]
            rows[(lay, FLOAT)] = per[lay] + d[lay] + boundary[lay]
        pairs = [(a, FLOAT, b, FLOAT, {"latency_ms": -2.0 * v})
                 for (a, b), v in self.boundary_ms.items()]
        return rows, pairs

    def summary(self) -> dict:
        """What the store and the report keep of the model."""
        return {"constant_ms": self.constant_ms, "layer_delta_ms": self.layer_delta_ms,
                "layer_delta_sd_ms": dict(zip(self.layers, np.sqrt(np.diag(self.cov))[
                    1:1 + len(self.layers)].tolist())),
                "boundary_ms": {f"{a}->{b}": v for (a, b), v in self.boundary_ms.items()},
                "boundary_common_ms": self.boundary_common_ms,
                "boundary_common_sd_ms": float(math.sqrt(max(0.0, self.cov[-1, -1]))),
                "observations": len(self.observations), "noise_scale": self.noise_scale,
                "prior": self.prior.source}


def features(layers: Sequence[str], edges: Sequence[tuple[str, str]],
             config: Mapping[str, str]) -> np.ndarray:
    """[1, float indicator per layer, boundary indicator per edge, number of boundaries]."""
    x = {lay: 1.0 if config.get(lay, INT8) != INT8 else 0.0 for lay in layers}
    bnd = [x[a] + x[b] - 2.0 * x[a] * x[b] for a, b in edges]
    return np.array([1.0] + [x[lay] for lay in layers] + bnd + [sum(bnd)])


def fit(layers: Sequence[str], edges: Sequence[tuple[str, str]], prior: Prior,
        observations: Iterable[Observation]) -> LatencyModel:
    """Posterior mean and covariance of θ = [c, d_l…, b_e…] given the prior and the data."""
    layers, edges, obs = tuple(layers), tuple(edges), list(observations)
    k = 2 + len(layers) + len(edges)
    if prior.mean.shape != (k,):
        raise ValueError(f"prior has {prior.mean.shape[0]} parameters, the model {k}")
    prior_w = np.diag(1.0 / prior.sd)
    rows, rhs = [prior_w], [prior.mean / prior.sd]
    if obs:
        x = np.array([features(layers, edges, o.config) for o in obs])
        se = np.array([o.se_ms for o in obs])
        y = np.array([o.latency_ms for o in obs])
        rows.append(x / se[:, None])
        rhs.append(y / se)
    a, b = np.vstack(rows), np.concatenate(rhs)
    theta = scipy.linalg.lstsq(a, b)[0]
    scale = 1.0
    if len(obs) >= 3:   # the measurements scatter more than their se says: widen, never narrow
        chi2 = float(np.sum(((x @ theta - y) / se) ** 2))
        scale = max(1.0, math.sqrt(chi2 / len(obs)))
    cov = scipy.linalg.pinvh(a.T @ a) * scale ** 2
    return LatencyModel(layers, edges, theta, cov, prior, obs, scale)


def observations(measured: Mapping[str, tuple[Mapping[str, str], Sequence[float]]]
                 ) -> list[Observation]:
    """name -> (config, p50 of each round) as Observations. The relative noise is pooled over
    every configuration measured more than once (two or three rounds give a poor spread
    each, but they share the machine), floored at NOISE_FLOOR; the se of a median of n
    rounds is that noise × its latency / √n."""
    # a failed round (no p50, or NaN) is no data: it must not become a NaN cost
    measured = {n: (cfg, good) for n, (cfg, ps) in measured.items()
                if (good := [float(v) for v in ps if v is not None and math.isfinite(v)])}
    dev = [(v / statistics.median(ps) - 1.0) ** 2 for _, ps in measured.values()
           if len(ps) > 1 for v in ps]
    n_multi = sum(len(ps) for _, ps in measured.values() if len(ps) > 1)
    multi = sum(1 for _, ps in measured.values() if len(ps) > 1)
    rel = math.sqrt(sum(dev) / max(1, n_multi - multi)) if multi else 0.0
    rel = max(rel, NOISE_FLOOR) if multi else max(0.03, NOISE_FLOOR)  # unknown: assume 3%
    out = []
    for name, (cfg, ps) in measured.items():
        med = statistics.median(ps)
        out.append(Observation(dict(cfg), med, rel * med / math.sqrt(len(ps)), name))
    return out


def on_one_scale(measured: Mapping[str, tuple[Mapping[str, str], Sequence[float]]],
                 ref: str = "0", within: float = SPEED_WITHIN
                 ) -> tuple[list[Observation], dict[str, float]]:
    """`observations` of "batch:name" entries, each batch divided by its speed relative to
    batch `ref`: the geometric mean, over the uniform configurations (one precision
    throughout) measured in both, of median / median. Every batch measures its configurations
    beside the uniform baselines so that this can be known: a shared VM changes speed by
    ±10% from one minute to the next (MobileNetV2 all-INT8 on a Zen 5: 1.84 ms while the
    patterns were timed, 1.54–1.69 ms four minutes later), and unscaled, such a shift lands in
    the layer costs. A speed known no better than ±`within` (95%) is left at 1: wider than
    the shifts it is there to correct, it would add its own noise (a 13 µs network's
    uniforms read 43% slow in one batch while the pick beside them did not; beside a CPU
    hog, ResNet-18's read 8–13% slow, ±14%, and the pick did not). Over the 50 picks of
    eleven stored sets of searches (`hilq search --replay`, bench/replay.py) the median |error| was 5.1% as
    read, 3.9% with every batch scaled and 3.9% with this gate, the max 52%, 40% and 52%, and
    the hog's worst pick 11.8%, 23.5% and 6.2%. Returns (observations, batch -> speed); a
    batch without a uniform beside it keeps speed 1."""
    obs = observations(measured)
    batch = {o.name: o.name.split(":", 1)[0] for o in obs}
    uniform: dict[str, dict[str, Observation]] = {}
    for o in obs:
        if len(set(o.config.values())) == 1 and o.latency_ms > 0:
            uniform.setdefault(batch[o.name], {})[next(iter(o.config.values()))] = o
    base = uniform.get(ref, {})
    speed = {}
    for b, got in uniform.items():
        both = [(o, base[p]) for p, o in got.items() if p in base]
        if not both:
            continue
        log = statistics.mean(math.log(o.latency_ms / r.latency_ms) for o, r in both)
        var = sum((o.se_ms / o.latency_ms) ** 2 + (r.se_ms / r.latency_ms) ** 2
                  for o, r in both) / len(both) ** 2
        speed[b] = math.exp(log) if b == ref or 1.96 * math.sqrt(var) <= within else 1.0
    out = [Observation(o.config, o.latency_ms / speed.get(batch[o.name], 1.0),
                       o.se_ms / speed.get(batch[o.name], 1.0), o.name) for o in obs]
    return out, speed


def prior_from_profiles(layers: Sequence[str], edges: Sequence[tuple[str, str]],
                        profiles: Iterable[tuple[Mapping[str, str], Mapping]],
                        wall_ms: Mapping[int, float] | None = None) -> Prior:
    """The prior from the engine's profiles: (config, profile) pairs where a profile has
    `layer_ms` (layer -> kernel ms) and `other_ms` (everything no layer owns: Q/DQ, reorders,
    pooling, adds). A layer's d = its float kernel time − its INT8 kernel time, over the
    profiles that ran it at each precision; the boundary cost is the slope of `other_ms`
    against the number of precision boundaries in the config. Profiled times are scaled to
    wall-clock by the measured latency of the same configs (`wall_ms`: index into
    `profiles` -> ms), since a profiler adds its own overhead and misses the gaps between
    kernels; the unexplained rest goes to the constant, whose prior is wide."""
    layers, edges, profs = tuple(layers), tuple(edges), list(profiles)
    if not profs:
        raise ValueError("no profiles to build the latency model's prior from")
    ratios = [wall / float(profs[i][1]["total_ms"]) for i, wall in (wall_ms or {}).items()
              if wall and profs[i][1].get("total_ms")]
    scale = statistics.median(ratios) if ratios else 1.0
    at: dict[tuple[str, str], list[float]] = {}
    for cfg, p in profs:
        for lay in layers:
            v = (p.get("layer_ms") or {}).get(lay)
            if v is not None and math.isfinite(v):
                at.setdefault((lay, FLOAT if cfg.get(lay, INT8) != INT8 else INT8), []).append(v)
    int8_total = [float(p["total_ms"]) for cfg, p in profs
                  if all(cfg.get(lay, INT8) == INT8 for lay in layers) and p.get("total_ms")]
    base = scale * (int8_total[0] if int8_total else
                    statistics.median(float(p.get("total_ms") or 0.0) for _, p in profs))
    floor = max(1e-3, 0.02 * base / max(1, len(layers)))   # 2% of an average layer
    d_mean, d_sd = [], []
    for lay in layers:
        f, q = at.get((lay, FLOAT)), at.get((lay, INT8))
        if f and q:
            d = scale * (statistics.mean(f) - statistics.mean(q))
            d_mean.append(d)
            d_sd.append(PRIOR_REL_SD * abs(d) + floor)
        else:   # the profile never saw it at both precisions: know nothing but its scale
            d_mean.append(0.0)
            d_sd.append(base / max(1, len(layers)))
    counts = np.array([features(layers, edges, cfg)[-1] for cfg, _ in profs])
    other = np.array([scale * float(p.get("other_ms") or 0.0) for _, p in profs])
    slope = 0.0
    if edges and counts.max() > 0 and len(set(counts.tolist())) > 1:
        design = np.column_stack([np.ones_like(counts), counts])
        slope = max(0.0, float(scipy.linalg.lstsq(design, other)[0][1]))
    # the profile can hide most of a boundary (a layout reorder fused into the float kernel
    # it feeds): the shared cost may sit far above the slope, up to an average layer's time,
    # and so may one edge's (a float stem's output is the largest tensor in the network)
    b_sd = slope + base / max(1, len(layers))
    return Prior(np.array([base] + d_mean + [0.0] * len(edges) + [slope]),
                 np.array([0.5 * base + floor] + d_sd + [b_sd] * (len(edges) + 1)))


def flat_prior(layers: Sequence[str], edges: Sequence[tuple[str, str]], base_ms: float) -> Prior:
    """No profile: every parameter centred on 0 (the constant on `base_ms`) with a width of
    an average layer; the measurements alone must carry the fit."""
    n = max(1, len(layers))
    k = 2 + len(layers) + len(edges)
    mean = np.zeros(k)
    mean[0] = base_ms
    sd = np.full(k, base_ms / n)
    sd[0] = 0.5 * base_ms
    return Prior(mean, sd, "flat")


def profile_patterns(layers: Sequence[str]) -> dict[str, dict[str, str]]:
    """The configurations profiled for the prior: all-INT8 and all-float give every layer's
    kernel time at each precision, the two alternating mixes put a boundary on most edges."""
    return {"uniform-" + INT8: dict.fromkeys(layers, INT8),
            "uniform-" + FLOAT: dict.fromkeys(layers, FLOAT),
            "alternate-a": {lay: FLOAT if i % 2 else INT8 for i, lay in enumerate(layers)},
            "alternate-b": {lay: INT8 if i % 2 else FLOAT for i, lay in enumerate(layers)}}

