"""The timing loop the agent uses, owned by the harness (MLPerf LoadGen's rule): warm up by
count AND time, then measure until BOTH a minimum count and a minimum duration are met
(capped by max_iters / max_duration_s). Part of the agent bundle: standard library only
(and the Protocol's defaults from measurement.py, also in the bundle).

Each sample is the host wall time of one `fn()` call from `time.perf_counter_ns`; a GPU
runtime also passes a `device_timer` (start()/stop() -> ms, e.g. CUDA events) and both are
kept. `harness_overhead_ms` times an empty call through the same loop, so the fixed cost the
harness adds to every sample is reported next to the samples it biases.

Throughput mode (offline, MLPerf's term) is the same back-to-back loop over batches of N;
the agent reports samples/s as N x calls / wall time of the whole timing window, so the
harness's own cost between calls counts against it rather than being hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

if __package__:
    from hilq.measurement import Protocol
else:  # in the agent's bundle, beside it
    from measurement import Protocol

DEFAULTS = Protocol().to_dict()    # the protocol's defaults: one source, on the host and device


@dataclass
class Timed:
    samples_ms: list[float]
    device_samples_ms: list[float] = field(default_factory=list)
    warmup_iters: int = 0
    t_start: float = 0.0      # perf_counter() at the first timed call
    t_end: float = 0.0        # perf_counter() after the last timed call
    capped: str | None = None  # "max_iters" / "max_duration_s" when a cap ended the run early

    @property
    def wall_s(self) -> float:
        return self.t_end - self.t_start


def measure(fn, protocol: dict, device_timer=None, mark=None) -> Timed:
    """Warm up, then time `fn()` one call per sample according to `protocol`. `mark()` (a
    power meter's reading) is called just before the first and after the last timed call."""
    clock = time.perf_counter_ns
    p = {**DEFAULTS, **protocol}
    warm_n, warm_s = int(p["warmup_iters"]), float(p["warmup_s"])
    min_n, min_s = int(p["min_iters"]), float(p["min_duration_s"])
    max_n, max_s = int(p["max_iters"]), float(p["max_duration_s"])

    t0, i = clock(), 0
    while i < warm_n or (clock() - t0) < warm_s * 1e9:
        fn()
        i += 1
        if (clock() - t0) >= max_s * 1e9:
            break

    samples, dev = [], []
    if mark is not None:
        mark()
    start = time.perf_counter()
    begin = clock()
    capped = None
    while True:
        if device_timer is not None:
            device_timer.start()
        a = clock()
        fn()
        b = clock()
        if device_timer is not None:
            dev.append(float(device_timer.stop()))
        samples.append((b - a) / 1e6)
        n, elapsed = len(samples), (b - begin) / 1e9
        if n >= min_n and elapsed >= min_s:
            break
        if n >= max_n:
            capped = "max_iters"
            break
        if elapsed >= max_s:
            capped = "max_duration_s"
            break
    end = time.perf_counter()
    if mark is not None:
        mark()
    return Timed(samples, dev, i, start, end, capped)


def harness_overhead_ms(iters: int = 2000) -> float:
    """Median time the loop records for a call that does nothing: the per-sample floor."""
    timed = measure(lambda: None, {"warmup_iters": 100, "warmup_s": 0, "min_iters": iters,
                                   "min_duration_s": 0})
    s = sorted(timed.samples_ms)
    return s[len(s) // 2]


def busy_wait(ms: float):
    """A calibration workload of known duration: spin on the clock for `ms` milliseconds."""
    ns = int(ms * 1e6)

    def fn():
        end = time.perf_counter_ns() + ns
        while time.perf_counter_ns() < end:
            pass

    return fn
