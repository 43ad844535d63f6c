"""A simulated device whose latency is a known sum: the test bed of the closed loop.

latency(config) = c + Σ layer cost at its precision + Σ boundary cost on every edge whose
two ends differ, plus seeded Gaussian noise per measured round (and a drift of the whole
machine per batch, as a shared VM gives). Its profiler reports each layer's kernel time with
its own distortion (a profiler scale and per-layer error) and puts boundary and
non-layer time into `other_ms`, as the engines do. With the truth known, the loop's picks can
be checked against brute force and its in-budget rate counted over seeded trials
(`experiments/sim_loop.py`, `tests/test_loop.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .latmodel import FLOAT, INT8


@dataclass
class SimDevice:
    layers: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]
    int8_ms: dict[str, float]
    float_ms: dict[str, float]
    boundary_ms: dict[tuple[str, str], float]
    constant_ms: float
    noise_ms: float = 0.0          # sd of one round's p50
    drift: float = 0.0             # sd of a batch's relative slow-down (shared machine)
    profile_error: float = 0.1     # sd of a profiled layer time's relative error
    profile_scale: float = 0.9     # kernels sum to less than wall time (gaps, overhead)
    boundary_seen: float = 1.0     # share of a boundary's cost the profiler shows (a layout
    #                                reorder fused into the kernel it feeds hides the rest)
    seed: int = 0
    calls: int = field(default=0, init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def latency(self, config) -> float:
        """The true, noise-free latency."""
        t = self.constant_ms
        for lay in self.layers:
            t += self.float_ms[lay] if config.get(lay, INT8) != INT8 else self.int8_ms[lay]
        for a, b in self.edges:
            if (config.get(a, INT8) != INT8) != (config.get(b, INT8) != INT8):
                t += self.boundary_ms[(a, b)]
        return t

    def measure(self, configs: dict[str, dict], rounds: int = 3) -> dict[str, list[float]]:
        """Each config's p50 per round, measured side by side (one drift for the batch)."""
        self.calls += 1
        slow = 1.0 + abs(self.rng.normal(0.0, self.drift)) if self.drift else 1.0
        return {name: [slow * self.latency(cfg) + self.rng.normal(0.0, self.noise_ms)
                       for _ in range(rounds)] for name, cfg in configs.items()}

    def profile(self, config) -> dict:
        """What an engine profiler reports for `config` (the shape devices.agent returns)."""
        layer_ms = {}
        for lay in self.layers:
            true = self.float_ms[lay] if config.get(lay, INT8) != INT8 else self.int8_ms[lay]
            layer_ms[lay] = self.profile_scale * true * (1 + self.rng.normal(0, self.profile_error))
        other = sum(self.boundary_ms[(a, b)] for a, b in self.edges
                    if (config.get(a, INT8) != INT8) != (config.get(b, INT8) != INT8))
        other = self.profile_scale * (self.boundary_seen * other + 0.3 * self.constant_ms)
        return {"layer_ms": layer_ms, "other_ms": other, "total_ms": sum(layer_ms.values()) + other}

    def smallest_delta(self) -> float:
        return min(abs(self.float_ms[lay] - self.int8_ms[lay]) for lay in self.layers)


def resnet_like(n: int = 21, seed: int = 0, noise_ms: float = 0.0,
                boundary: tuple[float, float] = (0.02, 0.08), **kw) -> SimDevice:
    """A chain of `n` layers with a skip edge every other layer, costs like ResNet-18 on a
    CPU where INT8 pays (float 1.3–2.5× a layer's INT8 time, a few layers where float is
    faster), boundaries a few percent of a layer (`boundary`: the range of each edge's cost
    in ms; ONNX Runtime on a Zen 5 is nearer (0.3, 0.9) with layers of 0.3–1.2 ms)."""
    rng = np.random.default_rng(seed)
    layers = tuple(f"layer{i}" for i in range(n))
    edges = tuple((layers[i], layers[i + 1]) for i in range(n - 1)) + \
        tuple((layers[i], layers[i + 2]) for i in range(0, n - 2, 2))
    q = {lay: float(rng.uniform(0.3, 1.2)) for lay in layers}
    ratio = rng.uniform(1.3, 2.5, n)
    ratio[rng.choice(n, size=max(1, n // 10), replace=False)] = rng.uniform(0.85, 0.97)
    f = {lay: q[lay] * float(r) for lay, r in zip(layers, ratio)}
    b = {e: float(rng.uniform(*boundary)) for e in edges}
    return SimDevice(layers, edges, q, f, b, constant_ms=float(rng.uniform(1.0, 2.0)),
                     noise_ms=noise_ms, seed=seed + 1, **kw)



def sensitivities(sim: SimDevice, seed: int = 0) -> dict[tuple[str, str], float]:
    """Seeded per-layer INT8 sensitivities (float costs nothing), the ILP's objective."""
    rng = np.random.default_rng(seed + 1000)
    out = {(lay, INT8): float(rng.uniform(0.1, 1.0)) for lay in sim.layers}
    out.update({(lay, FLOAT): 0.0 for lay in sim.layers})
    return out
