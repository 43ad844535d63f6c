"""The on-device agent: times one artifact with one runtime and prints one JSON result.

It is copied to the device with its siblings (`devices/bundle.py` lists them: `failures.py`,
`machine.py`, `window.py`, `evaluation.py`, `timing.py`, `power.py`, `runtimes/`, ... and the
core's `stats.py`, `accuracy.py`) and imports nothing from hilq: only the standard library,
numpy and the engine. One artifact per agent process (two engines in one process slow each
other down).

A run is a sequence of named steps (`run`, then `measure` on the loaded session): read the
protocol, check the artifact, pin the CPUs, open the runtime, load the artifact into a
`runtimes.Session`; check the reference, the timed window (`window.timed_run`: idle
baseline, timing loop, power) or the profiled run, memory, the LoadGen scenario, the
evaluation set, the kernels' verdict.

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
warm-up, then N inferences with the engine's own profiler on (`Session.profile`); the result
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
import importlib.util
import json
import os
import sys
import threading
import time
import traceback

if __package__:  # imported as devices.agent (host-side tools, tests)
    from . import evaluation, memory, runtimes, scenario, timing, window
    from .failures import EXIT_CODES, FAILURE_OF_EXIT, Failure
    from .machine import LoadProbe, cpu_facts, device_facts, load_before, loadavg, runtime_module
else:  # run as a script, here or on a device: siblings are top-level modules
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, _HERE)
    if not os.path.isfile(os.path.join(_HERE, "accuracy.py")):   # the source tree, not a bundle
        sys.path.append(os.path.join(os.path.dirname(_HERE), "hilq"))
    import evaluation
    import memory
    import runtimes
    import scenario
    import timing
    import window
    from failures import EXIT_CODES, FAILURE_OF_EXIT, Failure
    from machine import LoadProbe, cpu_facts, device_facts, load_before, loadavg, runtime_module

# what host-side code imports from here, defined in the agent's sibling modules
__all__ = ["EXIT_CODES", "FAILURE_OF_EXIT", "Failure", "LoadProbe", "cpu_facts", "device_facts",
           "main", "profile_summary", "run"]

FLOAT_VARIANTS = ("fp32", "fp16", "bf16")


# --- the run, as named steps -----------------------------------------------------------

def read_protocol(path: str) -> dict:
    """The protocol file over the defaults (one set of defaults: Protocol's)."""
    try:
        with open(path) as f:
            return {**timing.DEFAULTS, **json.load(f)}
    except (OSError, ValueError, TypeError) as e:
        raise Failure("bad_input", f"protocol: {e}") from e


def check_artifact(path: str) -> dict:
    """The artifact is there and matches its manifest's sha256; -> the manifest ({} if none)."""
    if not os.path.isfile(path):
        raise Failure("bad_input", f"artifact not found: {path}")
    manifest = runtimes.read_manifest(path)
    if manifest.get("sha256") and runtimes.sha256_file(path) != manifest["sha256"]:
        raise Failure("bad_input", "artifact does not match its manifest sha256")
    return manifest


def pin_cpus(protocol: dict) -> None:
    """This process pinned to the protocol's `affinity` CPUs, where it names some."""
    if protocol.get("affinity"):
        try:
            os.sched_setaffinity(0, protocol["affinity"])
        except (OSError, ValueError, TypeError) as e:
            raise Failure("bad_input", f"cannot pin to CPUs {protocol['affinity']}: {e}") from e


def open_runtime(name: str):
    """(runtime module, engine version); `unsupported` where the engine is not installed."""
    try:
        rt = runtime_module(name)
        return rt, rt.version()
    except ImportError as e:
        raise Failure("unsupported", f"runtime {name} not available here: {e}") from e


def check_scenario(protocol: dict) -> None:
    """A LoadGen scenario the agent knows, and LoadGen installed to run it."""
    if protocol.get("scenario"):
        if protocol["scenario"] not in scenario.SCENARIOS:
            raise Failure("bad_input", f"scenario {protocol['scenario']!r}: use "
                          f"{', '.join(scenario.SCENARIOS)}")
        if importlib.util.find_spec("mlperf_loadgen") is None:
            raise Failure("unsupported", f"scenario {protocol['scenario']} needs MLPerf LoadGen "
                          "on the device: pip install mlcommons-loadgen")


def load_artifact(rt, args, protocol: dict, mem):
    """The engine's session over the artifact (scratch files under --scratch); the memory
    tracker marks the end of loading."""
    try:
        scratch = {"scratch_dir": os.path.abspath(args.scratch)} if args.scratch else {}
        session = rt.load(args.artifact, {**protocol, **scratch})
        mem.mark("load")
    except Exception as e:  # noqa: BLE001 — the engine's own error, typed
        raise Failure("runtime_error", f"{args.runtime} could not load the artifact: "
                      f"{type(e).__name__}: {e}") from e
    return session


def check_reference(session, args, facts: dict) -> dict:
    """The engine's outputs for the reference's inputs, within tolerance; else `wrong_answer`."""
    check = evaluation.check_outputs(session, args.reference, args.rtol, args.atol)
    if not check["ok"]:
        raise Failure("wrong_answer", f"outputs differ from the reference (max abs "
                      f"{check['max_abs_diff']:.3g}, rtol {args.rtol}, atol {args.atol})",
                      outputs_check=check, facts=facts)
    return check


def scenario_run(session, feeds: dict, protocol: dict, scratch: str | None, est_ms: float
                 ) -> dict:
    """MLPerf LoadGen's scenario over the session, under the power meter (after the window);
    the SUT's own overhead is measured first, outside the meter (no inference in it)."""
    outdir = os.path.join(os.path.abspath(scratch or "."), "loadgen")
    over = scenario.sut_overhead(os.path.join(outdir, "null"))
    return window.metered(protocol, lambda: scenario.run(
        lambda: session.run(feeds), int(protocol.get("batch", 1)), protocol, outdir, est_ms,
        over))


def _intended_float(manifest: dict) -> int:
    """How many compute layers the bit config leaves float on purpose (a per-layer mix):
    those running in float kernels is what was asked for, not a degraded integer run.
    Engines rename fused float nodes, so the check compares counts, not names."""
    return sum(1 for v in (manifest.get("layer_map") or {}).values()
               if v.get("precision") in (None, *FLOAT_VARIANTS))


def judge_kernels(session, manifest: dict, result: dict) -> None:
    """The kernels the engine ran, in `result`; an integer variant whose layers ran in float
    (or whose layers asked float ran integer) is `degraded`."""
    kernels = session.kernels()
    if kernels is None:
        return
    result["kernels"] = kernels
    floats = kernels.get("float") or []
    if manifest.get("variant") in (None, *FLOAT_VARIANTS):
        return
    if len(floats) > _intended_float(manifest):
        result["status"] = "degraded"
        result["reason"] = f"layers ran in float kernels: {', '.join(floats[:10])}"
    elif len(floats) < _intended_float(manifest):
        # asked float, ran integer: the engine re-quantized a layer on its own
        result["status"] = "degraded"
        result["reason"] = (f"{_intended_float(manifest) - len(floats)} layer(s) asked "
                            "to stay float ran in integer kernels")


def measure(session, args, protocol: dict, manifest: dict, mem, result: dict) -> None:
    """The steps on a loaded session, filling `result`: reference check, inputs, the timed
    window (or the profiled run), memory, the LoadGen scenario, the evaluation set, the
    kernels' verdict."""
    facts = result["facts"]
    profile_iters = int(protocol.get("profile_iters") or 0)
    if profile_iters > 0 and not session.can_profile:
        raise Failure("unsupported", f"runtime {args.runtime} cannot profile", facts=facts)
    if args.reference:
        result["outputs_check"] = check_reference(session, args, facts)
    feeds = evaluation.inputs(session, int(protocol.get("seed", 0)), args.reference)
    mem.mark("setup")
    if profile_iters > 0:
        result.update(profiled_run(session, feeds, protocol, profile_iters, manifest,
                                   args.runtime))
    else:
        result.update(window.timed_run(session, feeds, protocol))
    # the shapes the engine ran, as it resolved them: what a batch or length sweep measured
    result.setdefault("timing", {})["input_shapes"] = {
        name: [int(d) for d in shape] for name, shape, _ in session.inputs}
    mem.mark("timed")
    result["memory"] = {**mem.figures(session.memory()),
                        "artifact_mb": round(os.path.getsize(args.artifact) / 2**20, 3)}
    if protocol.get("scenario") and profile_iters == 0:
        est = (result.get("latency_ms") or {}).get("p50") or 1.0
        result["scenario"] = scenario_run(session, feeds, protocol, args.scratch, est)
    if getattr(args, "eval", None):   # host-side callers may pass a bare Namespace
        result["accuracy"] = evaluation.evaluate(session, args.eval)
    judge_kernels(session, manifest, result)


def run(args) -> dict:
    """One agent run: the checks before loading, the engine's session, then `measure`; the
    session is closed whatever happens. -> the result (a Failure on failure)."""
    protocol = read_protocol(args.protocol)
    manifest = check_artifact(args.artifact)
    pin_cpus(protocol)
    rt, rt_version = open_runtime(args.runtime)
    check_scenario(protocol)
    facts = device_facts([args.runtime])
    mem = memory.Tracker()     # resident memory: loading, then the timed window on its own
    session = load_artifact(rt, args, protocol, mem)
    facts["engine"] = {"version": rt_version, **session.facts}
    result = {"status": "ok", "reason": None, "facts": facts, "protocol": protocol,
              "artifact_sha256": manifest.get("sha256"), "failure": None}
    try:
        measure(session, args, protocol, manifest, mem, result)
    except Failure:
        raise
    except Exception as e:  # noqa: BLE001
        raise Failure("runtime_error", f"{args.runtime} failed while running: "
                      f"{type(e).__name__}: {e}", facts=facts) from e
    finally:
        session.close()
    return result


# --- profiled runs ---------------------------------------------------------------------

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


def profiled_run(session, feeds: dict, protocol: dict, iters: int, manifest: dict,
                 runtime: str) -> dict:
    """Warm-up (the protocol's count), then `iters` profiled inferences: no latency stats."""
    warmup = int(protocol.get("warmup_iters", 10))
    load = load_before()
    t0 = time.perf_counter()
    for _ in range(warmup):
        session.run(feeds)
    t1 = time.perf_counter()
    nodes = session.profile(feeds, iters)
    t2 = time.perf_counter()
    if not nodes:
        raise Failure("runtime_error", f"{runtime} profiler reported no nodes")
    load["loadavg1_after"] = loadavg()
    summary = profile_summary(nodes, manifest, iters, direct=runtime in ("torch", "torch-cuda"))
    return {"profile": summary, "load": load,
            "timing": {"mode": "profile", "warmup_iters": warmup, "profile_iters": iters,
                       "warmup_s": t1 - t0, "wall_s": t2 - t1,
                       "batch": int(protocol.get("batch", 1))}}


# --- the command line ------------------------------------------------------------------

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


def parser() -> argparse.ArgumentParser:
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
    return p


def main(argv=None) -> int:
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the engine prints goes to stderr; stdout is ours alone
    sys.stdout = sys.stderr
    try:
        args = parser().parse_args(argv)
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
