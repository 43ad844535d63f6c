"""What the agent reads about the machine it runs on (part of the agent bundle: standard
library only, engines imported lazily): the device facts stored with every result (CPU,
GPUs, memory, the runtimes' versions), the runtime modules by name, and the CPU share other
processes use while the agent times (`LoadProbe`)."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys

if __package__:  # imported as devices.machine (host-side tools, tests)
    from . import runtimes
else:  # in the agent's bundle, beside it
    import runtimes

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile",
             "fma", "f16c", "asimd", "asimddp", "i8mm", "sve")


def runtime_module(name: str):
    """The runtime module of `name` (`torch-cuda` -> runtimes/torch_cuda.py); its engine is
    imported only when the module's functions are called."""
    return importlib.import_module(f"{runtimes.__name__}.{name.replace('-', '_')}")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_facts() -> dict:
    info = _read("/proc/cpuinfo")
    model, flags, cores = None, set(), set()
    phys = None
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "Hardware") and model is None:
            model = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"model": model or platform.processor() or platform.machine(),
            "arch": platform.machine(), "logical_cores": os.cpu_count(),
            "physical_cores": len(cores) or None, "usable_cores": usable,
            "flags": {f: f in flags for f in CPU_FLAGS}}


def _gpu_facts_nvml() -> list[dict]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 — no library or no driver: no NVIDIA GPU to report
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
            gpus.append({"name": pynvml.nvmlDeviceGetName(h), "driver": driver,
                         "memory": f"{mem // 2**20} MiB"})
        return gpus
    finally:
        pynvml.nvmlShutdown()


def gpu_facts() -> list[dict]:
    """NVIDIA GPUs from nvidia-smi, else from NVML (pynvml); [] when there are none."""
    if not shutil.which("nvidia-smi"):
        return _gpu_facts_nvml()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return gpus


def runtime_versions(names) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = runtime_module(name).version()
        except ImportError as e:
            out[name] = None if "No module named" in str(e) else f"error: {e}"
        except Exception as e:  # noqa: BLE001 — a broken engine is a fact, not a crash
            out[name] = f"error: {e}"
    return out


def device_facts(runtimes=()) -> dict:
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), None)
    return {"hostname": platform.node(), "os": platform.platform(),
            "kernel": platform.release(), "cpu": cpu_facts(),
            "memory_gb": round(mem_kb / 2**20, 2) if mem_kb else None,
            "gpus": gpu_facts(), "jetson": _read("/etc/nv_tegra_release").strip() or None,
            "python": platform.python_version(), "python_executable": sys.executable,
            "runtimes": runtime_versions(runtimes)}


# --- load: CPU busy by others while we time ---------------------------------------------

def _cpu_times():
    """(busy, total) jiffies of the whole machine from /proc/stat; None off Linux."""
    line = _read("/proc/stat").split("\n", 1)[0].split()
    if not line or line[0] != "cpu":
        return None
    v = [int(x) for x in line[1:9]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class LoadProbe:
    """CPU share used by *other* processes over a window: machine busy time minus our own
    process's CPU time, per usable core. The 1-min load average lags (it still counts the
    previous round), so the flag uses this; the load average is recorded too."""

    def __init__(self):
        self.m0, self.p0 = _cpu_times(), os.times()

    def others(self) -> float | None:
        m1, p1 = _cpu_times(), os.times()
        if self.m0 is None or m1 is None or m1[1] <= self.m0[1]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        ours = ((p1.user - self.p0.user) + (p1.system - self.p0.system)) * hz
        busy = max(0.0, (m1[0] - self.m0[0]) - ours)
        return round(busy / (m1[1] - self.m0[1]), 4)  # share of all cores' time


def loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def load_before() -> dict:
    """The machine's load before a run: 1-min load average and the cores we may use."""
    return {"loadavg1_before": loadavg(), "cores": len(os.sched_getaffinity(0))}
