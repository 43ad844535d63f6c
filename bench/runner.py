"""Measure variants on one device and runtime, in alternating rounds.

Each round runs every variant once (A B A B ...), each run a fresh agent process, so drift
on a shared machine falls on all variants alike. Per variant the samples of all rounds are
pooled into one `Measurement`, and the spread of p50 across rounds is stored in `rounds`.
A variant whose round fails is stored as that typed failure; the other variants go on.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from hilq.quant import evalset
from hilq.quant.artifact import Artifact

from hilq import stats
from hilq.measurement import Measurement, Protocol

from .evidence import paired
from .output import Done


def target_for(runtime: str) -> tuple[str, str]:
    """(export target, device) of the artifact `runtime` consumes: its own declaration."""
    from hilq.devices.runtimes import declaration

    consumes = declaration(runtime)[0]
    return consumes.target, consumes.device


def artifact_for(model, variant, out_dir, runtime: str = "ort", seed: int = 0,
                 calib_data: str = "real", distill_iters: int | None = None) -> Artifact:
    """A variant name built by quant.export for `runtime`'s target (`model`: a name or a
    `quant.models.ModelRef`); an Artifact passes through."""
    if isinstance(variant, Artifact):
        return variant
    from hilq.quant.export import build_artifact

    target, device = target_for(runtime)
    return build_artifact(model, variant, out_dir, target=target, device=device, seed=seed,
                          calib_data=calib_data,
                          **({"distill_iters": distill_iters} if distill_iters else {}))


def reference_for(art: Artifact) -> tuple[str | None, float, float]:
    """(reference .npz beside the artifact, rtol, atol) for the agent's wrong-answer check.
    The tolerance allows 4x the deviation ONNX Runtime showed at export (rounding ties of
    integer kernels) and never less than 1e-3, or the artifact's own `reference_atol` (the
    ONNX route's: its reference is ORT's exact Q/DQ arithmetic, which another engine's
    rounding ties move by a step of the last integer layer): it catches broken engines, not
    ulps."""
    name = art.manifest.get("reference")
    path = Path(art.path).parent / name if name else None
    if path is None or not path.is_file():
        return None, 1e-3, 1e-4
    dev = art.manifest.get("reference_ort_max_abs_diff") or 0.0
    floor = art.manifest.get("reference_atol") or 1e-3
    return str(path), 1e-2, max(floor, 4 * float(dev))


def with_simulated(accuracy: dict, manifest: dict) -> dict:
    """The device's accuracy figures with the fake-quant model's beside them (from the
    manifest, computed at export on the same evaluation set): `simulated_top1`, ...,
    and `gap_top1` / `gap_agreement` = device − simulated, in fractions."""
    if not accuracy:
        return accuracy
    sim = manifest.get("simulated") or {}
    out = dict(accuracy)
    for k in ("top1", "agreement_fp32", "kl", "sqnr_db"):
        out[f"simulated_{k}"] = sim.get(k)
    for k, gap in (("top1", "gap_top1"), ("agreement_fp32", "gap_agreement")):
        out[gap] = (out[k] - sim[k]) if out.get(k) is not None and sim.get(k) is not None \
            else None
        # the gap's evidence: device and simulation paired sample by sample
        test = paired((accuracy.get("per_sample") or {}).get(k),
                      (sim.get("per_sample") or {}).get(k))
        out[f"paired_{k}"] = test.to_dict() if test is not None else None
    return out


def _stored(store, run_id: str, kind: str, model: str, device: str, runtime: str
            ) -> dict[tuple[str, int], Measurement]:
    """(variant, round) -> Measurement already stored in this run: what a resumed run skips."""
    return {(k.variant, k.round): m for k, m in store.load_measurements(run_id, kind=kind).items()
            if (k.model, k.device, k.runtime) == (model, device, runtime)}


def _line(m: Measurement, r: int) -> Done:
    if not m.ok:
        return Done(f"{m.model} {m.variant} on {m.device}/{m.runtime} round {r + 1}: {m.failure}: {m.reason}")
    busy = " (busy machine)" if (m.load or {}).get("busy") else ""
    a, acc = m.accuracy or {}, ""
    for k, label in (("top1", "top-1"), ("agreement_fp32", "agreement with fp32")):
        if a.get(k) is not None:
            sim = a.get(f"simulated_{k}")
            acc = (f", {label} on the device {a[k]:.2%}"
                   + (f" (simulated {sim:.2%})" if sim is not None else ""))
            break
    return Done(f"{m.model} {m.variant} on {m.device}/{m.runtime} round {r + 1}: "
                f"p50 {m.latency_ms.get('p50', float('nan')):.3f} ms, {m.status}{busy}{acc}")


def measure_artifacts(device, runtime: str, model: str, arts: dict[str, Artifact],
                      protocol: Protocol, rounds: int = 3, store=None, run_id: str | None = None,
                      kind: str = "bench", reference: str | None = None,
                      on_result: Callable[[str], None] | None = None
                      ) -> dict[str, list[Measurement]]:
    """name -> its per-round Measurements (variant = name), measured A B A B ...; each one
    stored as it arrives when a results store is given, and rounds already stored in this run
    are taken from the store instead of measured again (a killed run resumes). A variant that
    failed with a failure another round cannot fix (wrong answer, missing runtime) is not
    retried."""
    stored = _stored(store, run_id, kind, model, device.name, runtime) if store is not None else {}
    out: dict[str, list[Measurement]] = {name: [] for name in arts}
    for r in range(rounds):
        for name, art in arts.items():
            done = out[name]
            if (name, r) in stored:
                done.append(stored[(name, r)])
                continue
            if done and done[-1].failure not in (None, "timeout", "busy"):
                continue
            ref, rtol, atol = (reference, 1e-3, 1e-4) if reference else reference_for(art)
            # accuracy once per variant (the engine is deterministic), until a round gives it
            ev = None if any(d.accuracy for d in done) else evalset.load(art)
            # and the LoadGen scenario once per variant, after a round of hilq's own timing
            proto = replace(protocol, scenario="") if any(d.scenario for d in done) else protocol
            m = device.run(art, proto, runtime, reference=ref, rtol=rtol, atol=atol,
                           **({"evalset": ev} if ev is not None else {}))
            m = replace(m, model=model or m.model, variant=name,
                        accuracy=with_simulated(m.accuracy, art.manifest))
            done.append(m)
            if store is not None:
                store.add_measurement(run_id, m, kind=kind, round=r,
                                      bit_config=art.manifest.get("bit_config"))
            if on_result is not None:
                on_result(_line(m, r))
    return out


def profile_artifacts(device, runtime: str, model: str, arts: dict[str, Artifact],
                      protocol: Protocol, iters: int = 20, store=None, run_id: str | None = None,
                      on_result: Callable[[str], None] = lambda s: None
                      ) -> dict[str, Measurement]:
    """name -> one *profiled* agent run of that artifact (`profile_iters=iters`: warm-up, then
    `iters` inferences under the engine's profiler; `Measurement.profile` holds per-node and
    per-layer ms, no latency statistics). Each is stored with kind="profile" (its `profile`
    in the store's `extra` column) when a store is given; one already stored in this run is
    taken from the store instead of profiled again."""
    proto = replace(protocol, profile_iters=iters)
    done = {}
    if store is not None:
        done = {variant: m for (variant, _), m in
                _stored(store, run_id, "profile", model, device.name, runtime).items()}
    out: dict[str, Measurement] = {}
    for name, art in arts.items():
        if name in done:
            out[name] = done[name]
            continue
        ref, rtol, atol = reference_for(art)
        m = device.run(art, proto, runtime, reference=ref, rtol=rtol, atol=atol)
        m = replace(m, model=model or m.model, variant=name)
        out[name] = m
        if store is not None:
            store.add_measurement(run_id, m, kind="profile", round=0,
                                  bit_config=art.manifest.get("bit_config"))
        p = m.profile or {}
        on_result(f"{m.model} {name} on {m.device}/{m.runtime} profile: {m.failure}: {m.reason}"
                  if not m.ok else
                  f"{m.model} {name} on {m.device}/{m.runtime} profile: {len(p.get('nodes', []))} "
                  f"nodes, {p.get('total_ms', 0.0):.3f} ms, {len(p.get('layer_ms', {}))} layers "
                  f"({(p.get('mapped_fraction') or 0.0):.0%} of the time)")
    return out


def _peaks(runs: list[Measurement]) -> dict:
    """A variant's memory over its rounds: the largest of each figure (one agent process
    each round, so a peak is a peak of one process)."""
    keys = {k for m in runs for k, v in (m.memory or {}).items() if isinstance(v, (int, float))
            and not isinstance(v, bool)}
    out = {k: max(m.memory[k] for m in runs if isinstance((m.memory or {}).get(k), (int, float)))
           for k in keys}
    first = next((m.memory for m in runs if m.memory), {})
    out.update({k: v for k, v in first.items() if k not in out})
    return out


def combine(runs: list[Measurement], seed: int = 0) -> Measurement:
    """One Measurement from a variant's rounds: pooled samples, spread of p50 across rounds."""
    first = runs[0]
    failed = [m for m in runs if not m.ok]
    p50s = [m.latency_ms["p50"] for m in runs if m.ok and m.latency_ms]
    spread = {"n": len(runs), "ok": len(runs) - len(failed), "p50_ms": p50s,
              "cv_p50": (statistics.stdev(p50s) / statistics.mean(p50s)) if len(p50s) > 1 else None,
              "range_p50_ms": (max(p50s) - min(p50s)) if p50s else None}
    if failed:
        return replace(failed[0], rounds=spread)
    samples = [s for m in runs for s in m.samples_ms]
    energies = [m.energy_j_per_inference for m in runs]
    busy = any(m.load.get("busy") for m in runs)
    reasons = sorted({part for m in runs for part in (m.reason or "").split("; ")
                      if part and not part.startswith("busy machine")})
    if busy:
        reasons.append(f"busy machine in {sum(bool(m.load.get('busy')) for m in runs)} of "
                       f"{len(runs)} rounds (others' CPU use above the protocol's busy_load)")
    return replace(
        first, latency_ms=stats.summarize(samples, seed), samples_ms=samples,
        accuracy=next((m.accuracy for m in runs if m.accuracy), {}),
        scenario=next((m.scenario for m in runs if m.scenario), {}),
        memory=_peaks(runs),
        throughput=statistics.mean(m.throughput for m in runs if m.throughput),
        energy_j_per_inference=(statistics.mean(energies) if None not in energies else None),
        status="degraded" if any(m.status == "degraded" for m in runs) else "ok",
        reason="; ".join(reasons) or None, rounds=spread,
        load={"busy": busy, "rounds": [m.load for m in runs]})


def bench_variants(model, variants, device, runtime: str, protocol: Protocol | None = None,
                   rounds: int = 3, out_dir: str | None = None, reference: str | None = None,
                   store=None, run_id: str | None = None, calib_data: str = "real",
                   label: str = "", on_result: Callable[[str], None] | None = None
                   ) -> list[Measurement]:
    """Build (or take prebuilt) artifacts, measure them in `rounds` alternating rounds, and
    return one combined Measurement per variant, in the order given, named `variant + label`
    (a batch sweep's "@b8"). Artifacts built without an `out_dir` go to a temporary folder
    that is removed afterwards."""
    protocol = protocol or Protocol()
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hilq-artifacts-"))
        arts = {}
        for v in variants:
            art = artifact_for(model, v, out_dir, runtime, seed=protocol.seed,
                               calib_data=calib_data)
            name = art.manifest.get("variant", "?") if isinstance(v, Artifact) else v
            arts[name + label] = art
        per = measure_artifacts(device, runtime, getattr(model, "name", model), arts, protocol, rounds, store,
                                run_id, reference=reference, on_result=on_result)
    return [combine(runs, protocol.seed) for runs in per.values()]
