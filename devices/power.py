"""Power meters for the agent: NVML, Linux powercap/RAPL, Jetson tegrastats, an external
command, or none. Part of the agent bundle: standard library only (pynvml lazily).

A meter is a pair of plain functions `(read, close)`. `read()` returns `(watts, joules)`:
counter meters (RAPL, NVML energy, a command printing joules) give cumulative joules since
the meter opened; rate meters (tegrastats, a command printing watts, NVML power) give
instantaneous watts. `Sampler` calls `read()` from a background thread every `interval_s`
and stamps each sample with `time.perf_counter()`, the clock of the timing loop, so energy
is integrated over exactly the timing window: counter deltas read at the window's edges,
or the trapezoid of the watt trace clipped to the window.

Anything that prevents a reading (no RAPL on this CPU, no GPU, permission denied) raises
`MeterError`; the agent then reports energy as null with that reason, never a guess.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import threading
import time


class MeterError(Exception):
    """The meter cannot read on this device; the message is the reason stored with null."""


# --- RAPL -------------------------------------------------------------------------------

def rapl(root: str = "/sys/class/powercap"):
    """Sum of the top-level RAPL package zones (`intel-rapl:N`, also used by AMD), from
    `energy_uj` deltas; a counter that passed `max_energy_range_uj` wrapped around once."""
    zones = sorted(z for z in glob.glob(os.path.join(root, "intel-rapl:*"))
                   if re.fullmatch(r"intel-rapl:\d+", os.path.basename(z)))
    if not zones:
        raise MeterError(f"no RAPL package zones under {root}")

    def _read(path: str) -> int:
        try:
            with open(path) as f:
                return int(f.read().strip())
        except PermissionError as e:
            raise MeterError(f"RAPL not readable ({path}): run as root or relax its mode") from e
        except (OSError, ValueError) as e:
            raise MeterError(f"RAPL read failed ({path}): {e}") from e

    ranges = [_read(os.path.join(z, "max_energy_range_uj")) for z in zones]
    last = [_read(os.path.join(z, "energy_uj")) for z in zones]
    total_uj = [0]
    lock = threading.Lock()

    def read():
        with lock:
            for k, z in enumerate(zones):
                now = _read(os.path.join(z, "energy_uj"))
                delta = now - last[k]
                if delta < 0:  # wrapped past max_energy_range_uj
                    delta += ranges[k]
                total_uj[0] += delta
                last[k] = now
            return None, total_uj[0] / 1e6

    return read, lambda: None


# --- NVML -------------------------------------------------------------------------------

def nvml(index: int = 0):
    """NVIDIA GPU via nvidia-ml-py (`pynvml`): total-energy counter (mJ, Volta and newer)
    plus instantaneous board power (mW) for the trace."""
    try:
        import pynvml
    except ImportError as e:
        raise MeterError("pynvml (nvidia-ml-py) not installed") from e
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise MeterError(f"NVML unavailable: {e}") from e
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError as e:
        pynvml.nvmlShutdown()
        raise MeterError(f"NVML energy counter unavailable on GPU {index}: {e}") from e

    def read():
        mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        mw = pynvml.nvmlDeviceGetPowerUsage(handle)
        return mw / 1e3, (mj - start_mj) / 1e3

    return read, pynvml.nvmlShutdown


# --- line-reading meters (tegrastats, external command) --------------------------------

# A rail: `NAME 5012mW/4980mW`, or (old JetPacks, no unit) a VDD_/POM_/VIN_ name.
_TEGRA_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)mW/(\d+)mW"
                         r"|\b((?:VDD|POM|VIN)_[A-Z0-9_]+)\s+(\d+)/(\d+)\b")


def parse_tegrastats(line: str, rail: str | None = None) -> float | None:
    """Watts on `rail` from one tegrastats line (`VDD_IN 5012mW/4980mW` on JetPack 5+,
    `POM_5V_IN 2450/2450` on older ones: current/average mW). Default rail: VDD_IN, then
    POM_5V_IN (the board input), then the sum of all rails."""
    rails = {m[0] or m[3]: int(m[1] or m[4]) for m in _TEGRA_RAIL.findall(line)}
    if not rails:
        return None
    if rail:
        return rails[rail] / 1e3 if rail in rails else None
    for name in ("VDD_IN", "POM_5V_IN"):
        if name in rails:
            return rails[name] / 1e3
    return sum(rails.values()) / 1e3


_NUMBER_UNIT = re.compile(r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)")
_SCALE = {"": ("W", 1.0), "w": ("W", 1.0), "mw": ("W", 1e-3), "j": ("J", 1.0),
          "mj": ("J", 1e-3), "uj": ("J", 1e-6)}


def parse_reading(line: str) -> tuple[str, float] | None:
    """`12.5`, `12.5 W`, `850mW` -> ("W", watts); `3.2 J`, `41000 uJ` -> ("J", joules)."""
    m = _NUMBER_UNIT.search(line)
    if not m or m.group(2).lower() not in _SCALE:
        return None
    unit, scale = _SCALE[m.group(2).lower()]
    return unit, float(m.group(1)) * scale


def _line_meter(argv: list[str], parse):
    """Start `argv`, parse each stdout line in a thread, keep the latest reading."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1)
    except OSError as e:
        raise MeterError(f"cannot start {argv[0]}: {e}") from e
    latest: dict = {}
    first = threading.Event()

    def pump():
        for line in proc.stdout:
            r = parse(line)
            if r is not None:
                latest["r"] = r
                first.set()
        first.set()

    threading.Thread(target=pump, daemon=True).start()
    if not first.wait(5.0) or "r" not in latest:
        proc.kill()
        raise MeterError(f"{argv[0]} printed no reading within 5 s (exit {proc.poll()})")
    j0 = latest["r"][1] if latest["r"][0] == "J" else None

    def read():
        unit, value = latest["r"]
        return (value, None) if unit == "W" else (None, value - j0)

    def close():
        proc.kill()
        proc.wait()

    return read, close


def tegrastats(interval_ms: int = 50, rail: str | None = None):
    def parse(line):
        w = parse_tegrastats(line, rail)
        return None if w is None else ("W", w)

    return _line_meter(["tegrastats", "--interval", str(int(interval_ms))], parse)


def command(cmd: str):
    """Any program printing one reading per line (watts or joules, unit optional = W) and
    flushing each line. Run without a shell: `cmd` is split with shlex."""
    return _line_meter(shlex.split(cmd), parse_reading)


def open_meter(spec: str, interval_s: float = 0.05):
    """`nvml[:i]`, `rapl`, `tegrastats[:RAIL]`, `command:<cmd>`, `none` -> (read, close);
    None for `none`."""
    kind, _, arg = spec.partition(":")
    if kind == "none":
        return None
    if kind == "rapl":
        return rapl(arg or "/sys/class/powercap")
    if kind == "nvml":
        return nvml(int(arg or 0))
    if kind == "tegrastats":
        return tegrastats(int(interval_s * 1000), arg or None)
    if kind == "command":
        if not arg:
            raise MeterError("command meter needs a command: command:<cmd>")
        return command(arg)
    raise MeterError(f"unknown power meter {spec!r} (nvml | rapl | tegrastats | command:<cmd> | none)")


# --- sampling and integration ---------------------------------------------------------

class Sampler:
    """Reads a meter every `interval_s` in a background thread: [(t, watts, joules), ...]."""

    def __init__(self, read, interval_s: float = 0.05):
        self.read, self.interval_s = read, interval_s
        self.trace: list[tuple[float, float | None, float | None]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self):
        w, j = self.read()
        self.trace.append((time.perf_counter(), w, j))

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 — recorded, the run goes on without energy
                self.error = f"meter read failed: {e}"
                return
            self._stop.wait(self.interval_s)

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        if self.error is None:
            self.sample()


def _interp(points: list[tuple[float, float]], t: float) -> float:
    if t <= points[0][0]:
        return points[0][1]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return points[-1][1]


def energy_between(trace, t0: float, t1: float) -> float | None:
    """Joules spent in [t0, t1]: the counter's delta if the meter has one, else the
    trapezoid of the watt trace clipped to the window. None without enough samples."""
    trace = sorted(trace)
    counter = [(t, j) for t, _w, j in trace if j is not None]
    if len(counter) >= 2:
        return _interp(counter, t1) - _interp(counter, t0)
    watts = [(t, w) for t, w, _j in trace if w is not None]
    if len(watts) < 2 or t1 <= t0:
        return None
    inside = [(t, w) for t, w in watts if t0 < t < t1]
    pts = [(t0, _interp(watts, t0)), *inside, (t1, _interp(watts, t1))]
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))


def summarize(trace, idle: tuple[float, float], window: tuple[float, float], inferences: int,
              meter: str, max_points: int = 500) -> dict:
    """Average watts at idle and in the timing window, and joules per inference (gross,
    plus `dynamic_j_per_inference` above the idle baseline)."""
    idle_j = energy_between(trace, *idle)
    run_j = energy_between(trace, *window)
    out = {"meter": meter, "idle_w": None, "avg_w": None, "energy_j": None,
           "j_per_inference": None, "dynamic_j_per_inference": None, "reason": None}
    dt_idle, dt_run = idle[1] - idle[0], window[1] - window[0]
    if idle_j is not None and dt_idle > 0:
        out["idle_w"] = idle_j / dt_idle
    if run_j is None or dt_run <= 0 or inferences <= 0:
        out["reason"] = "too few meter samples in the timing window"
    else:
        out["avg_w"] = run_j / dt_run
        out["energy_j"] = run_j
        out["j_per_inference"] = run_j / inferences
        if out["idle_w"] is not None:
            out["dynamic_j_per_inference"] = (out["avg_w"] - out["idle_w"]) * dt_run / inferences
    out["trace"] = watt_trace(trace, window[0], max_points)
    return out


def watt_trace(trace, t_ref: float, max_points: int = 500) -> list[list[float]]:
    """[[seconds from t_ref, watts], ...]; counter-only meters give watts from deltas."""
    trace = sorted(trace)
    pts = [(t, w) for t, w, _j in trace if w is not None]
    if not pts:
        counter = [(t, j) for t, _w, j in trace if j is not None]
        pts = [(b[0], (b[1] - a[1]) / (b[0] - a[0]))
               for a, b in zip(counter, counter[1:]) if b[0] > a[0]]
    step = max(1, len(pts) // max_points)
    return [[round(t - t_ref, 4), round(w, 4)] for t, w in pts[::step]]
