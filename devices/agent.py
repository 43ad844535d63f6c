"""The on-device agent: times one artifact with one runtime and prints one JSON result.

It is copied to the device with its siblings (`stats.py`, `timing.py`, `power.py`,
`runtimes/`) and imports nothing from hilq: only the standard library, numpy and the engine.
One artifact per agent process (two engines in one process slow each other down).

    python agent.py --artifact FILE --protocol protocol.json --runtime ort
                    [--reference ref.npz --rtol 1e-3 --atol 1e-4] [--eval evalset.npz]
    python agent.py --facts [--runtimes ort,openvino]

The artifact's manifest (`FILE.manifest.json`) is read if present and its sha256 checked.
The reference `.npz` holds `input:<name>` arrays and `output:<k>` arrays; the outputs the
engine gives for those inputs must match within the tolerance, else `wrong_answer`.

With `--eval`, after the timed window the artifact runs over the whole evaluation set (see
`accuracy.py` for its arrays) and the result carries `accuracy`: top-1, agreement with FP32,
mean KL, SQNR, the worst samples and the set's sha256: accuracy measured on the device, by
the engine that was timed, never inside the timed window.

A protocol with `profile_iters` N > 0 asks for a *profiled* run instead of a timed one:
warm-up, then N inferences with the engine's own profiler on (`Loaded.profile`); the result
carries `profile` (per engine node and per hilq layer, see `profile_summary`) and no latency
statistics. A runtime that cannot profile fails as `unsupported`.

stdout carries exactly one JSON object (the engine's own prints are sent to stderr): the
Measurement fields the agent knows, or `{"status": "failed", "failure": KIND, "reason": ...}`.
Exit codes (typed, so the host can tell failures apart even without the JSON):

    0  ok (the run may still be flagged busy or degraded in the JSON)
    1  agent_crash   — an unexpected exception (a bug, or the interpreter died)
    2  bad_input     — bad arguments, protocol, missing artifact, sha256 mismatch
    3  unsupported   — the runtime is not installed on this device (or cannot profile)
    4  runtime_error — the engine failed to load or run the artifact
    5  wrong_answer  — outputs differ from the reference beyond tolerance
    6  timeout       — `--deadline-s` passed: the agent ended itself

`--deadline-s S` ends the agent S seconds after it starts, whatever it is doing: the host
kills a late agent through its pid file, but a host cut off by a silent partition cannot,
and the agent must not run on, holding the device, after the host has given up on it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback

if __package__:  # imported as devices.agent (host-side tools, tests)
    from hilq import accuracy, stats

    from . import memory, power, scenario, timing
else:  # run as a script, here or on a device: siblings are top-level modules
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import accuracy
    import memory
    import power
    import scenario
    import stats
    import timing

EXIT_CODES = {"ok": 0, "agent_crash": 1, "bad_input": 2, "unsupported": 3,
              "runtime_error": 4, "wrong_answer": 5, "timeout": 6}
FAILURE_OF_EXIT = {v: k for k, v in EXIT_CODES.items()}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile",
             "fma", "f16c", "asimd", "asimddp", "i8mm", "sve")
FLOAT_VARIANTS = ("fp32", "fp16", "bf16")


class Failure(Exception):
    def __init__(self, kind: str, reason: str, **extra):
        super().__init__(reason)
        self.kind, self.reason, self.extra = kind, reason, extra


def _runtimes():
    """The runtimes package, inside hilq or beside the agent in its bundle."""
    if __package__:
        return importlib.import_module(".runtimes", __package__)
    return importlib.import_module("runtimes")


def _runtime_module(name: str):
    return importlib.import_module(f"{_runtimes().__name__}.{name.replace('-', '_')}")


# --- device facts --------------------------------------------------------------------------

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
            out[name] = _runtime_module(name).version()
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


def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# --- the run ---------------------------------------------------------------------------

def _inputs(loaded, seed: int, reference: str | None = None) -> dict:
    """The timed run's inputs: the reference's real samples where it has them (a model whose
    work depends on its input, a sample rate or a state that must be valid), repeated to
    the engine's shape; seeded random values otherwise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    real: dict = {}
    if reference:
        with np.load(reference) as ref:
            real = {**_named(ref, "input:"), **_named(ref, "fixed:")}
    feeds = {}
    for name, shape, dtype in loaded.inputs:
        r = real.get(name)
        if r is not None and tuple(r.shape) == tuple(shape):
            feeds[name] = r.astype(dtype)
        elif r is not None and r.ndim == len(shape) and tuple(r.shape[1:]) == tuple(shape[1:]):
            feeds[name] = np.resize(r, shape).astype(dtype)   # samples repeated to the batch
        elif np.issubdtype(np.dtype(dtype), np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 8, size=shape).astype(dtype)
    return feeds


def _intended_float(manifest: dict) -> int:
    """How many compute layers the bit config leaves float on purpose (a per-layer mix):
    those running in float kernels is what was asked for, not a degraded integer run.
    Engines rename fused float nodes, so the check compares counts, not names."""
    return sum(1 for v in (manifest.get("layer_map") or {}).values()
               if v.get("precision") in (None, *FLOAT_VARIANTS))


def _run_in_batches(loaded, feeds: dict, max_batch: int = 64, fixed: dict | None = None
                    ) -> list:
    """Run many inputs through an engine compiled for a fixed batch (OpenVINO's static
    reshape, TensorRT profiles): slices of that batch, the last one padded by repeating its
    rows, outputs joined. An engine with a dynamic batch gets slices of `max_batch` (an
    evaluation set of thousands of images would not fit at once). `fixed` inputs (a state,
    a sample rate) go whole with every slice."""
    import numpy as np

    fixed = fixed or {}
    batch = {name: shape[0] for name, shape, _ in loaded.inputs if shape}
    n = len(next(iter(feeds.values())))
    b = batch.get(next(iter(feeds)), n)
    if not isinstance(b, int) or b < 1:
        b = min(n, max_batch)
    if b == n:
        return loaded.run({**feeds, **fixed})
    parts = []
    for start in range(0, n, b):
        chunk = {k: v[start:start + b] for k, v in feeds.items()}
        short = b - len(next(iter(chunk.values())))
        if short:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)])
                     for k, v in chunk.items()}
        # padding rows are cut from outputs batched on axis 0; an output batched elsewhere
        # (sequence-first [T, N, V]) is kept whole, as the host's reference run keeps it
        parts.append([np.asarray(o)[: b - short] if short and np.ndim(o) else np.asarray(o)
                      for o in loaded.run({**chunk, **fixed})])
    return [np.concatenate(outs) if outs[0].ndim else outs[0] for outs in zip(*parts)]


def _named(arrays, prefix: str) -> dict:
    """`prefix:<name>` arrays of a reference or evaluation set, by name."""
    return {k[len(prefix):]: arrays[k] for k in arrays if k.startswith(prefix)}


def check_outputs(loaded, reference: str, rtol: float, atol: float) -> dict:
    import numpy as np

    with np.load(reference) as ref:
        arrays = {k: ref[k] for k in ref.files}
    feeds, fixed = _named(arrays, "input:"), _named(arrays, "fixed:")
    want = [arrays[f"output:{k}"] for k in range(len(_named(arrays, "output:")))]
    got = _run_in_batches(loaded, feeds, fixed=fixed)
    worst_abs, worst_rel, ok = 0.0, 0.0, len(got) >= len(want)
    for g, w in zip(got, want):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        if g.shape != w.shape:
            ok = False
            continue
        diff = np.abs(g - w)
        worst_abs = max(worst_abs, float(diff.max(initial=0)))
        worst_rel = max(worst_rel, float((diff / (np.abs(w) + 1e-12)).max(initial=0)))
        ok = ok and bool(np.all(diff <= atol + rtol * np.abs(w)))
    return {"ok": ok, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
            "rtol": rtol, "atol": atol, "outputs": len(want)}


def evaluate(loaded, path: str) -> dict:
    """The artifact over the whole evaluation set: `accuracy.evaluate`'s figures plus the
    set's sha256 (what the figures were measured on)."""
    import numpy as np

    try:
        ev = dict(np.load(path))
    except (OSError, ValueError) as e:
        raise Failure("bad_input", f"evaluation set {path}: {e}") from e
    feeds = _named(ev, "input:")
    if not feeds:
        raise Failure("bad_input", f"evaluation set {path} holds no input:<name> arrays")
    t0 = time.perf_counter()
    outs = [np.asarray(o) for o in _run_in_batches(loaded, feeds, fixed=_named(ev, "fixed:"))]
    res = accuracy.evaluate(outs, ev)
    res["eval_sha256"] = _runtimes().sha256_file(path)
    res["wall_s"] = time.perf_counter() - t0
    return res


def run(args) -> dict:
    try:
        with open(args.protocol) as f:
            protocol = {**timing.DEFAULTS, **json.load(f)}   # one set of defaults: Protocol's
    except (OSError, ValueError, TypeError) as e:
        raise Failure("bad_input", f"protocol: {e}") from e
    if not os.path.isfile(args.artifact):
        raise Failure("bad_input", f"artifact not found: {args.artifact}")
    manifest = _runtimes().read_manifest(args.artifact)
    if manifest.get("sha256") and _runtimes().sha256_file(args.artifact) != manifest["sha256"]:
        raise Failure("bad_input", "artifact does not match its manifest sha256")
    if protocol.get("affinity"):
        try:
            os.sched_setaffinity(0, protocol["affinity"])
        except (OSError, ValueError, TypeError) as e:
            raise Failure("bad_input", f"cannot pin to CPUs {protocol['affinity']}: {e}") from e

    try:
        rt = _runtime_module(args.runtime)
        rt_version = rt.version()
    except ImportError as e:
        raise Failure("unsupported", f"runtime {args.runtime} not available here: {e}") from e
    if protocol.get("scenario"):
        if protocol["scenario"] not in scenario.SCENARIOS:
            raise Failure("bad_input", f"scenario {protocol['scenario']!r}: use "
                          f"{', '.join(scenario.SCENARIOS)}")
        if importlib.util.find_spec("mlperf_loadgen") is None:
            raise Failure("unsupported", f"scenario {protocol['scenario']} needs MLPerf LoadGen "
                          "on the device: pip install mlcommons-loadgen")
    facts = device_facts([args.runtime])
    mem = memory.Tracker()     # resident memory: loading, then the timed window on its own
    try:
        scratch = {"scratch_dir": os.path.abspath(args.scratch)} if args.scratch else {}
        loaded = rt.load(args.artifact, {**protocol, **scratch})
        mem.mark("load")
    except Exception as e:  # noqa: BLE001 — the engine's own error, typed
        raise Failure("runtime_error", f"{args.runtime} could not load the artifact: "
                      f"{type(e).__name__}: {e}") from e
    facts["engine"] = {"version": rt_version, **loaded.facts}
    result = {"status": "ok", "reason": None, "facts": facts, "protocol": protocol,
              "artifact_sha256": manifest.get("sha256"), "failure": None}
    profile_iters = int(protocol.get("profile_iters") or 0)
    try:
        if profile_iters > 0 and loaded.profile is None:
            raise Failure("unsupported", f"runtime {args.runtime} cannot profile", facts=facts)
        if args.reference:
            check = check_outputs(loaded, args.reference, args.rtol, args.atol)
            result["outputs_check"] = check
            if not check["ok"]:
                raise Failure("wrong_answer", f"outputs differ from the reference (max abs "
                              f"{check['max_abs_diff']:.3g}, rtol {args.rtol}, atol {args.atol})",
                              outputs_check=check, facts=facts)
        feeds = _inputs(loaded, int(protocol.get("seed", 0)), args.reference)
        mem.mark("setup")
        if profile_iters > 0:
            result.update(_profiled_run(loaded, feeds, protocol, profile_iters, manifest,
                                        args.runtime))
        else:
            result.update(_timed_run(lambda: loaded.run(feeds), loaded, protocol))
        # the shapes the engine ran, as it resolved them: what a batch or length sweep measured
        result.setdefault("timing", {})["input_shapes"] = {
            name: [int(d) for d in shape] for name, shape, _ in loaded.inputs}
        mem.mark("timed")
        result["memory"] = {**mem.figures(loaded.memory() if loaded.memory else None),
                            "artifact_mb": round(os.path.getsize(args.artifact) / 2**20, 3)}
        if protocol.get("scenario") and profile_iters == 0:
            est = (result.get("latency_ms") or {}).get("p50") or 1.0
            result["scenario"] = _metered(protocol, lambda: scenario.run(
                lambda: loaded.run(feeds), int(protocol.get("batch", 1)), protocol,
                os.path.join(os.path.abspath(args.scratch or "."), "loadgen"), est))
        if getattr(args, "eval", None):   # host-side callers may pass a bare Namespace
            result["accuracy"] = evaluate(loaded, args.eval)
        if loaded.kernels is not None:
            result["kernels"] = loaded.kernels()
            floats = result["kernels"].get("float") or []
            if manifest.get("variant") not in (None, *FLOAT_VARIANTS) and \
                    len(floats) > _intended_float(manifest):
                result["status"] = "degraded"
                result["reason"] = f"layers ran in float kernels: {', '.join(floats[:10])}"
            elif manifest.get("variant") not in (None, *FLOAT_VARIANTS) and \
                    len(floats) < _intended_float(manifest):
                # asked float, ran integer: the engine re-quantized a layer on its own
                result["status"] = "degraded"
                result["reason"] = (f"{_intended_float(manifest) - len(floats)} layer(s) asked "
                                    "to stay float ran in integer kernels")
    except Failure:
        raise
    except Exception as e:  # noqa: BLE001
        raise Failure("runtime_error", f"{args.runtime} failed while running: "
                      f"{type(e).__name__}: {e}", facts=facts) from e
    finally:
        loaded.close()
    return result


def profile_summary(nodes: list[dict], manifest: dict, iters: int,
                    direct: bool = False) -> dict:
    """Engine node records -> the profile of one run. Each node gets `layer`: the hilq layer
    its sources map to through the manifest's `layer_map` (ONNX node -> layer), else None
    (`layers` too when it covers several). `direct`: sources are hilq layer names themselves
    (torch programs have no layer_map). `layer_ms` sums each layer's nodes, a node covering k
    layers giving each 1/k of its time; `other_ms` / `other_by_op` hold nodes with no layer;
    `mapped_fraction` = sum(layer_ms) / total_ms; `unmapped_layers`: layer_map layers that
    no node mapped to."""
    lmap = manifest.get("layer_map") or {}
    known = {v.get("layer") for v in lmap.values() if v.get("layer")}
    known |= set(manifest.get("bit_config") or {})
    layer_ms: dict[str, float] = {}
    other_by_op: dict[str, float] = {}
    other = total = 0.0
    out = []
    for node in nodes:
        node = dict(node)
        ms = float(node.get("ms") or 0.0)
        layers = []
        for src in node.get("sources") or []:
            lay = (lmap[src].get("layer") if src in lmap
                   else src if (src in known or direct) else None)
            if lay and lay not in layers:
                layers.append(lay)
        node["layer"] = layers[0] if layers else None
        if len(layers) > 1:
            node["layers"] = layers
        for lay in layers:
            layer_ms[lay] = layer_ms.get(lay, 0.0) + ms / len(layers)
        if not layers:
            other += ms
            op = str(node.get("op"))
            other_by_op[op] = other_by_op.get(op, 0.0) + ms
        total += ms
        out.append(node)
    return {"iters": iters, "nodes": out, "layer_ms": layer_ms, "other_ms": other,
            "other_by_op": other_by_op, "total_ms": total,
            "mapped_fraction": (sum(layer_ms.values()) / total) if total > 0 else None,
            "unmapped_layers": sorted(known - set(layer_ms)) if lmap else []}


def _profiled_run(loaded, feeds: dict, protocol: dict, iters: int, manifest: dict,
                  runtime: str) -> dict:
    """Warm-up (the protocol's count), then `iters` profiled inferences: no latency stats."""
    warmup = int(protocol.get("warmup_iters", 10))
    load = {"loadavg1_before": _loadavg(), "cores": len(os.sched_getaffinity(0))}
    t0 = time.perf_counter()
    for _ in range(warmup):
        loaded.run(feeds)
    t1 = time.perf_counter()
    nodes = loaded.profile(feeds, iters)
    t2 = time.perf_counter()
    if not nodes:
        raise Failure("runtime_error", f"{runtime} profiler reported no nodes")
    load["loadavg1_after"] = _loadavg()
    summary = profile_summary(nodes, manifest, iters, direct=runtime in ("torch", "torch-cuda"))
    return {"profile": summary, "load": load,
            "timing": {"mode": "profile", "warmup_iters": warmup, "profile_iters": iters,
                       "warmup_s": t1 - t0, "wall_s": t2 - t1,
                       "batch": int(protocol.get("batch", 1))}}


def _metered(protocol: dict, go) -> dict:
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


def _timed_run(fn, loaded, protocol: dict) -> dict:
    batch = int(protocol.get("batch", 1))
    load = {"loadavg1_before": _loadavg(), "cores": len(os.sched_getaffinity(0))}
    meter_spec = protocol.get("power", "none") or "none"
    meter, sampler, power_out = None, None, None
    interval = float(protocol.get("power_interval_s", 0.05))
    idle_probe = LoadProbe()
    try:
        meter = power.open_meter(meter_spec, interval)
    except power.MeterError as e:
        power_out = {"meter": meter_spec, "avg_w": None, "j_per_inference": None,
                     "reason": str(e)}
    idle_s = float(protocol.get("idle_s", 1.0)) if meter else 0.2
    t_idle0 = time.perf_counter()
    if meter:
        sampler = power.Sampler(meter[0], interval).start()
    time.sleep(idle_s)  # idle baseline (power) and others' CPU use while we are idle
    t_idle1 = time.perf_counter()
    load["others_busy_before"] = idle_probe.others()
    run_probe = LoadProbe()
    try:
        # a meter reading exactly at each edge of the timing window (after warm-up)
        timed = timing.measure(fn, protocol, loaded.device_timer,
                               mark=sampler.sample if sampler else None)
    finally:
        if sampler:
            sampler.stop()
        if meter:
            meter[1]()
    load["others_busy_during"] = run_probe.others()
    load["loadavg1_after"] = _loadavg()
    limit = float(protocol.get("busy_load", 0.5))
    shares = [x for x in (load["others_busy_before"], load["others_busy_during"]) if x is not None]
    # others' share of the machine's CPU time vs the per-core load limit (0.5: half the cores)
    load["busy"] = bool(shares) and max(shares) >= limit
    inferences = len(timed.samples_ms) * batch
    if sampler:
        if sampler.error:
            power_out = {"meter": meter_spec, "avg_w": None, "j_per_inference": None,
                         "reason": sampler.error}
        else:
            power_out = power.summarize(sampler.trace, (t_idle0, t_idle1),
                                        (timed.t_start, timed.t_end), inferences, meter_spec)
    if power_out is None:
        power_out = {"meter": "none", "avg_w": None, "j_per_inference": None,
                     "reason": "no power meter configured"}
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
    notes = []
    if timed.capped:
        notes.append(f"stopped by {timed.capped} before the minimums were met")
    if load["busy"]:
        notes.append(f"busy machine: other processes used {max(shares):.0%} of the CPU "
                     f"(limit {limit:.0%})")
    if notes:
        out["reason"] = "; ".join(notes)
    return out


def _deadline(seconds: float, stdout) -> None:
    """End this process `seconds` from now, with a `timeout` result, from a daemon thread
    (the main thread may be inside the engine, where no signal handler runs)."""
    def end():
        stdout.write(json.dumps({"status": "failed", "failure": "timeout",
                                 "reason": f"agent ended itself at its {seconds:.0f} s "
                                           "deadline"}) + "\n")
        stdout.flush()
        os._exit(EXIT_CODES["timeout"])

    t = threading.Timer(seconds, end)
    t.daemon = True
    t.start()


def main(argv=None) -> int:
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the engine prints goes to stderr; stdout is ours alone
    sys.stdout = sys.stderr
    p = argparse.ArgumentParser(prog="agent.py", description=__doc__.split("\n")[0])
    p.add_argument("--facts", action="store_true", help="print device facts and exit")
    p.add_argument("--runtimes", default="ort", help="runtimes to report with --facts")
    p.add_argument("--artifact")
    p.add_argument("--protocol")
    p.add_argument("--runtime", default="ort")
    p.add_argument("--reference")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--eval", help="evaluation set .npz: accuracy on the device (accuracy.py)")
    p.add_argument("--scratch", help="folder for the engine's scratch files (default: $TMPDIR)")
    p.add_argument("--deadline-s", type=float, help="end the agent after this many seconds")
    try:
        args = p.parse_args(argv)
    except SystemExit:
        return EXIT_CODES["bad_input"]
    if args.deadline_s:
        _deadline(args.deadline_s, stdout)
    code = 0
    try:
        if args.facts:
            result = device_facts([r for r in args.runtimes.split(",") if r])
        elif not (args.artifact and args.protocol):
            raise Failure("bad_input", "--artifact and --protocol are required")
        else:
            result = run(args)
    except Failure as f:
        result = {"status": "failed", "failure": f.kind, "reason": f.reason, **f.extra}
        code = EXIT_CODES[f.kind]
    except Exception as e:  # noqa: BLE001 — reported as a crash with its traceback
        traceback.print_exc()
        result = {"status": "failed", "failure": "agent_crash",
                  "reason": f"agent crashed: {type(e).__name__}: {e}"}
        code = EXIT_CODES["agent_crash"]
    stdout.write(json.dumps(result, default=str) + "\n")
    stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
