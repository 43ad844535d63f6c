"""Resident memory of the agent process: what loading the artifact and running it cost.

Part of the agent bundle (standard library only). On Linux the figures come from
`/proc/self/status` (VmRSS now, VmHWM the peak), and the peak is reset between phases by
writing 5 to `/proc/self/clear_refs`, so the timed window has a peak of its own. Elsewhere
`resource.getrusage` gives the peak since the process started, and the phases' peaks are
marked as not separable.
"""

from __future__ import annotations

import os

STATUS = "/proc/self/status"


def _status_mb() -> dict[str, float]:
    out = {}
    try:
        with open(STATUS) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024     # kB -> MiB
    except (OSError, ValueError, IndexError):
        pass
    return out


def _maxrss_mb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024   # bytes | kB


def _reset_peak() -> bool:
    """VmHWM := VmRSS (Linux 4.0+); False where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Tracker:
    """Call `mark(phase)` at the end of each phase: the resident set then and its peak
    during the phase. `figures()` -> {"rss_start_mb", "<phase>_rss_mb", "<phase>_peak_mb",
    ..., "source", "separable"}."""

    def __init__(self):
        now = _status_mb()
        self.source = "proc" if now else "getrusage"
        self.separable = bool(now) and _reset_peak()
        self.out: dict = {"rss_start_mb": _round(now.get("VmRSS")), "source": self.source,
                          "separable": self.separable}

    def mark(self, phase: str) -> None:
        now = _status_mb()
        if now:
            self.out[f"{phase}_rss_mb"] = _round(now.get("VmRSS"))
            self.out[f"{phase}_peak_mb"] = _round(now.get("VmHWM"))
        else:
            self.out[f"{phase}_peak_mb"] = _round(_maxrss_mb())
        if self.separable:
            _reset_peak()

    def figures(self, engine: dict | None = None) -> dict:
        out = dict(self.out)
        if out.get("load_rss_mb") is not None and out.get("rss_start_mb") is not None:
            out["load_delta_mb"] = _round(out["load_rss_mb"] - out["rss_start_mb"])
        if engine:
            out["engine"] = engine
        # the documented summary (`hilq bench --json`): the process's peak over every phase,
        # and the GPU's where the engine reports one (None on a CPU engine)
        peaks = [v for k, v in out.items() if k.endswith("_peak_mb") and v is not None]
        out["peak_rss_mb"] = max(peaks) if peaks else None
        gpu = [v for k, v in (engine or {}).items() if k in GPU_FIGURES and v is not None]
        out["peak_gpu_mb"] = max(gpu) if gpu else None
        return out


# engine figures that are GPU memory: torch's caching allocator, TensorRT's execution context
GPU_FIGURES = ("cuda_max_allocated_mb", "trt_context_device_mb")


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
