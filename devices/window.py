"""The timed window of an agent run (part of the agent bundle: standard library and the
bundle's own modules), as named steps: open the power meter, an idle baseline (the meter's
idle power, others' CPU use while we are idle), the timing loop (`timing.measure`, a meter
reading at each edge), then the figures: latency statistics, throughput, energy, the
machine's load. `metered` runs LoadGen's scenario under the same meter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

if __package__:  # imported as devices.window (host-side tools, tests)
    from hilq import stats

    from . import power, timing
    from .machine import LoadProbe, load_before, loadavg
else:  # in the agent's bundle, beside it
    import power
    import stats
    import timing
    from machine import LoadProbe, load_before, loadavg


def _no_power(meter: str, reason: str) -> dict:
    return {"meter": meter, "avg_w": None, "j_per_inference": None, "reason": reason}


@dataclass
class Meter:
    """The protocol's power meter for one window: `read`/`close` when it opened, else the
    `power` figures saying why not; `sampler` samples it from the idle baseline on."""

    spec: str
    interval: float
    read: object = None
    close: object = None
    sampler: object = None
    failed: dict | None = None
    idle: tuple = field(default=(0.0, 0.0))     # perf_counter() edges of the idle baseline
    stopped: bool = False

    @classmethod
    def open(cls, protocol: dict) -> Meter:
        m = cls(protocol.get("power", "none") or "none",
                float(protocol.get("power_interval_s", 0.05)))
        try:
            opened = power.open_meter(m.spec, m.interval)
        except power.MeterError as e:
            m.failed = _no_power(m.spec, str(e))
        else:
            if opened:
                m.read, m.close = opened
        return m

    def stop(self) -> None:
        """The sampler's last reading, then the meter closed; once."""
        if self.stopped:
            return
        self.stopped = True
        if self.sampler:
            self.sampler.stop()
        if self.read:
            self.close()

    def figures(self, window: tuple[float, float], inferences: int) -> dict:
        """The `power` result: the meter's trace over the idle baseline and the window."""
        if self.sampler:
            if self.sampler.error:
                return _no_power(self.spec, self.sampler.error)
            return power.summarize(self.sampler.trace, self.idle, window, inferences,
                                   self.spec)
        return self.failed or _no_power("none", "no power meter configured")


def idle_baseline(protocol: dict, meter: Meter) -> None:
    """Sleep with the meter sampling (the protocol's idle_s; 0.2 s without a meter, for the
    load probe alone): the idle power, and others' CPU use while we are idle."""
    idle_s = float(protocol.get("idle_s", 1.0)) if meter.read else 0.2
    t_idle0 = time.perf_counter()
    if meter.read:
        meter.sampler = power.Sampler(meter.read, meter.interval).start()
    time.sleep(idle_s)  # idle baseline (power) and others' CPU use while we are idle
    meter.idle = (t_idle0, time.perf_counter())


def timed_window(session, feeds: dict, protocol: dict, meter: Meter
                 ) -> tuple[timing.Timed, float | None]:
    """The timing loop over `session.run(feeds)`, a meter reading exactly at each edge of
    the window (after warm-up); the meter stops after it. Also others' CPU share meanwhile."""
    probe = LoadProbe()
    try:
        timed = timing.measure(lambda: session.run(feeds), protocol, session.device_timer,
                               mark=meter.sampler.sample if meter.sampler else None)
    finally:
        meter.stop()
    return timed, probe.others()


def _busy(load: dict, protocol: dict) -> float | None:
    """Flags `load["busy"]`: others' share of the machine's CPU time at or over the per-core
    load limit (0.5: half the cores); returns the larger share (None: not measured)."""
    limit = float(protocol.get("busy_load", 0.5))
    shares = [x for x in (load["others_busy_before"], load["others_busy_during"]) if x is not None]
    load["busy"] = bool(shares) and max(shares) >= limit
    return max(shares) if shares else None


def _notes(timed: timing.Timed, load: dict, share: float | None, protocol: dict) -> list[str]:
    notes = []
    if timed.capped:
        notes.append(f"stopped by {timed.capped} before the minimums were met")
    if load["busy"]:
        limit = float(protocol.get("busy_load", 0.5))
        notes.append(f"busy machine: other processes used {share:.0%} of the CPU "
                     f"(limit {limit:.0%})")
    return notes


def timed_result(timed: timing.Timed, protocol: dict, load: dict, power_out: dict) -> dict:
    """The window's figures as the agent reports them."""
    batch = int(protocol.get("batch", 1))
    inferences = len(timed.samples_ms) * batch
    seed = int(protocol.get("seed", 0))
    epoch = time.time() - time.perf_counter()  # perf_counter -> wall clock, to align runs
    out = {"latency_ms": stats.summarize(timed.samples_ms, seed), "samples_ms": timed.samples_ms,
           "throughput": inferences / timed.wall_s if timed.wall_s > 0 else None,
           "energy_j_per_inference": power_out.get("j_per_inference"), "power": power_out,
           "load": load, "harness_overhead_ms": timing.harness_overhead_ms(500),
           "timing": {"warmup_iters": timed.warmup_iters, "wall_s": timed.wall_s,
                      "t_start_epoch": timed.t_start + epoch, "t_end_epoch": timed.t_end + epoch,
                      "capped": timed.capped, "mode": protocol.get("mode", "latency"),
                      "batch": batch}}
    if timed.device_samples_ms:
        out["device_latency_ms"] = stats.summarize(timed.device_samples_ms, seed)
    return out


def timed_run(session, feeds: dict, protocol: dict) -> dict:
    """Idle baseline, then the timed window, under the protocol's power meter: latency,
    throughput, energy and the machine's load as the agent reports them."""
    load = load_before()
    idle_probe = LoadProbe()
    meter = Meter.open(protocol)
    try:
        idle_baseline(protocol, meter)
        load["others_busy_before"] = idle_probe.others()
        timed, load["others_busy_during"] = timed_window(session, feeds, protocol, meter)
    finally:
        meter.stop()
    load["loadavg1_after"] = loadavg()
    share = _busy(load, protocol)
    inferences = len(timed.samples_ms) * int(protocol.get("batch", 1))
    out = timed_result(timed, protocol, load,
                       meter.figures((timed.t_start, timed.t_end), inferences))
    notes = _notes(timed, load, share, protocol)
    if notes:
        out["reason"] = "; ".join(notes)
    return out


def metered(protocol: dict, go) -> dict:
    """LoadGen's whole run (`go()` -> its result) under the protocol's power meter, after an
    idle baseline: joules per inference over the run, gross and with idle subtracted (MLPerf
    Power's figure), in the result's `energy`. Without a meter, `go()` alone."""
    spec = protocol.get("power", "none") or "none"
    if spec == "none":
        return go()
    interval = float(protocol.get("power_interval_s", 0.05))
    try:
        read, close = power.open_meter(spec, interval)
    except power.MeterError as e:
        return {**go(), "energy": {"meter": spec, "j_per_inference": None, "reason": str(e)}}
    sampler = power.Sampler(read, interval).start()
    try:
        t_idle0 = time.perf_counter()
        time.sleep(float(protocol.get("idle_s", 1.0)))
        t_idle1 = time.perf_counter()
        sampler.sample()
        t0 = time.perf_counter()
        res = go()
        t1 = time.perf_counter()
        sampler.sample()
    finally:
        sampler.stop()
        close()
    if sampler.error:
        energy = {"meter": spec, "j_per_inference": None, "reason": sampler.error}
    else:
        energy = power.summarize(sampler.trace, (t_idle0, t_idle1), (t0, t1),
                                 int(res.get("samples") or 0), spec, max_points=100)
    energy["window_s"] = t1 - t0
    return {**res, "energy": energy}
