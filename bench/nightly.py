"""The nightly loop: bench matrix and searches from a config, into the store, compared with
history, rendered as a report.

Resumable: the run id comes from the config's hash, so a killed run started again with the
same config continues where it stopped — every stored measurement, accuracy, cost row and
allocation has a natural key and is skipped, never duplicated. Devices run in parallel, each
exclusively (the device lock); a device that fails is recorded and the others go on.
Artifacts for the bench matrix are built before any timing starts, so that host work never
overlaps a local measurement (design.md, "Measurement rules").
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hilq.devices import inventory
from hilq.devices.errors import DeviceError

from . import runner
from .config import Config, Search
from .errors import one_line
from .matrix import bench_device


@dataclass
class NightlyResult:
    run_id: str
    status: str = "ok"
    measurements: list = field(default_factory=list)    # one summary row per bench variant
    searches: list = field(default_factory=list)
    failures: list = field(default_factory=list)        # (what, reason)
    regressions: list = field(default_factory=list)     # flagged rows
    report: str | None = None
    seconds: float = 0.0
    placement: dict = field(default_factory=dict)       # engine ray: device -> its node

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _accuracy(store, run_id: str, b, seed: int, say, arts: dict | None = None) -> None:
    """Top-1 of each variant on the model's labelled test split (fake-quant model; the ONNX
    artifact agrees within 0.3 pt, see tests/test_export.py). Stored once per run. A built
    artifact's manifest already holds it (`simulated`): only a variant without one is
    quantized again here."""
    from hilq.quant.models import load_model
    from hilq.quant.pipeline import quantize_model, variant_bit_config
    from hilq.quant.spec import DISTILL_ITERS
    from hilq.quant.transform import fold_bn

    model, variants = b.model, b.variants
    stored = {(r["model"], r["variant"]) for r in store.rows("accuracy", run_id)}
    entry = load_model(b.ref)
    data = entry.data()
    if data.test_y is None:
        return
    folded = None
    for v in variants:
        if (model, v) in stored:
            continue
        art = (arts or {}).get(v)
        top1 = (art.manifest.get("simulated") or {}).get("top1") if art is not None else None
        if top1 is None:
            folded = folded or fold_bn(entry.build().eval())
            res = quantize_model(entry, variant_bit_config(folded, v), seed=seed,
                                 calib_data=b.calib_data, distill_iters=DISTILL_ITERS)
            top1 = res.quant_top1 if res.bit_config.layers else res.fp32_top1
        store.add_accuracy(run_id, model, v, top1, len(data.test_y), data.name or model)
        say(f"accuracy {model} {v}: top-1 {top1:.2%}")


def run_nightly(cfg: Config, *, say: Callable[[str], None] = print,
                report: bool = True, resume: str | None = None) -> NightlyResult:
    """The whole night (the module docstring). `resume`: a run id to reopen and fill in (a
    run that ended failed, say after a device was lost): what it has is kept, the rest is
    measured."""
    from .report import render
    from .store import open_store

    t0 = time.perf_counter()
    store = open_store(cfg.db)
    run_id = None
    try:
        run_id = store.begin_run({**_identity(cfg), "config_hash": cfg.hash}, seed=cfg.seed,
                                 resume=True, run_id=resume)
        result = NightlyResult(run_id)
        say(f"run {run_id} ({cfg.source or 'embedded config'}) -> {store.name}")
        devs = inventory.load(cfg.inventory)
        artifacts_dir = Path(cfg.db).parent / "artifacts" if "://" not in cfg.db \
            else Path("results") / "artifacts"

        # 1. build every bench artifact first, before any timing; 2. measure: devices in
        # parallel, each exclusively (threads here, or tasks on a Ray cluster)
        if cfg.engine == "ray":
            built = _on_ray(cfg, run_id, artifacts_dir, result, say)
        else:
            built = _on_threads(cfg, store, run_id, devs, artifacts_dir, result, say)

        _after_timing(cfg, store, run_id, result, built, devs, artifacts_dir, say)
        if report:
            rep = render(store, run=run_id, out_dir=Path(cfg.reports) / run_id)
            result.report = str(rep.html)
        result.seconds = time.perf_counter() - t0
        return result
    except KeyboardInterrupt:      # Ctrl-C, SIGTERM: what is stored stays; the run says so
        if run_id is not None:
            store.finish_run(run_id, "interrupted")
            say(f"run {run_id} interrupted: every measurement taken is stored; "
                f"hilq nightly --resume {run_id} measures the rest")
        raise
    finally:
        store.close()


def _after_timing(cfg: Config, store, run_id: str, result: NightlyResult, built: dict, devs,
                  artifacts_dir: Path, say) -> None:
    """Steps 3–5: accuracy of the bench variants (host work, after timing), the searches one
    at a time (they build and measure), regressions against history; the run's status."""
    from . import regress
    from .search import run_search

    for b in cfg.bench:
        if b.accuracy:
            try:
                _accuracy(store, run_id, b, cfg.seed, say, built.get(b.model))
            except Exception as e:  # noqa: BLE001
                result.failures.append((f"accuracy {b.model}", one_line(e)))
    for s in cfg.search:
        result.searches.append(_search(cfg, store, run_id, devs, s, artifacts_dir, say,
                                       result.failures, run_search))
    rows = regress.detect(store, run_id, threshold=cfg.regression_threshold,
                          lookback=cfg.lookback)
    result.regressions = [r for r in rows if r.get("flagged")]
    missed = [x for x in result.searches
              if "budget_missed" in (x.get("status"), x.get("search_status"))]
    result.status = "failed" if result.failures else "budget_missed" if missed else (
        "regressed" if result.regressions else "ok")
    store.finish_run(run_id, result.status)


def _identity(cfg: Config) -> dict:
    d = cfg.to_dict()
    for how in ("engine", "ray_address"):     # the same night on either engine: one run
        d.pop(how, None)
    return d


def _build_matrix(cfg: Config, result: NightlyResult, say, build) -> tuple[dict, dict]:
    """Every bench entry × runtime through `build(i, bench, runtime)` -> (its artifacts here,
    what a device's measurement takes); a model that will not build is a failure and the rest
    go on. Returns (device -> [(bench, runtime, for the device)], model -> its artifacts)."""
    per_device: dict[str, list] = {}
    built: dict[str, dict] = {}
    for i, b in enumerate(cfg.bench):
        for runtime in b.runtimes:
            try:
                arts, for_device = build(i, b, runtime)
            except Exception as e:  # noqa: BLE001 — a model that will not build is a failure
                result.failures.append((f"build {b.model} for {runtime}", one_line(e)))
                continue
            built.setdefault(b.model, arts)
            for d in b.devices:
                per_device.setdefault(d, []).append((b, runtime, for_device))
        say(f"built {b.model}: {', '.join(b.variants)}")
    return per_device, built


def _on_threads(cfg: Config, store, run_id: str, devs, artifacts_dir: Path,
                result: NightlyResult, say) -> dict[str, dict]:
    """Build on this host, then measure each device in its own thread. Returns model -> its
    artifacts (the first runtime's), for the accuracy step."""
    def build(_, b, runtime):
        arts = {v: runner.artifact_for(b.ref, v, artifacts_dir, runtime, seed=cfg.seed,
                                       calib_data=b.calib_data) for v in b.variants}
        return arts, arts

    per_device, built = _build_matrix(cfg, result, say, build)

    def one_device(name: str):
        try:
            device = inventory.open_device(name, devs)
        except DeviceError as e:
            return [], [(f"device {name}", f"{e.kind}: {e}")]
        try:
            return bench_device(cfg, store, run_id, device, per_device[name], say)
        except Exception as e:  # noqa: BLE001 — one device failing must not stop the others
            return [], [(f"device {name}", one_line(e))]
        finally:
            device.close()

    with ThreadPoolExecutor(max_workers=max(1, len(per_device))) as pool:
        for rows, failures in pool.map(one_device, list(per_device)):
            result.measurements += rows
            result.failures += failures
    return built


def _on_ray(cfg: Config, run_id: str, artifacts_dir: Path, result: NightlyResult,
            say) -> dict[str, dict]:
    """The same two steps as tasks on a Ray cluster (bench/farm.py): builds anywhere,
    each device's measurements on the node that owns it. `result.placement` says where."""
    from . import farm

    devices = sorted({d for b in cfg.bench for d in b.devices})
    ray = farm.connect(cfg.ray_address, devices, say)
    owners = farm.check(ray, cfg.db, devices)
    jobs = {(i, runtime, v): (b.ref, v, runtime, cfg.seed, b.calib_data)
            for i, b in enumerate(cfg.bench) for runtime in b.runtimes for v in b.variants}
    refs = farm.build_all(ray, list(jobs.values()), str(artifacts_dir), say)
    def build(i, b, runtime):      # here too (the accuracy step reads the manifests)
        mine = {v: refs[jobs[(i, runtime, v)]] for v in b.variants}
        return {v: farm.unpack(ray.get(r), artifacts_dir / "farm") for v, r in mine.items()}, mine

    per_device, built = _build_matrix(cfg, result, say, build)
    for out in farm.measure_all(ray, cfg, run_id, per_device, owners, say):
        result.measurements += out["rows"]
        result.failures += [tuple(f) for f in out["failures"]]
        result.placement[out["device"]] = out["node"]
    return built


def _search(cfg: Config, store, run_id: str, devs, s: Search, artifacts_dir: Path, say,
            failures: list, run_search) -> dict:

    name = f"search {s.model} on {s.device}/{s.runtime}"
    done = [r for r in store.rows("allocations", run_id) if r["model"] == s.model
            and r["device"] == s.device and r["runtime"] == s.runtime and r["name"] == "chosen"]
    if done and done[0].get("measured"):
        say(f"{name}: already done in this run")
        return {"model": s.model, "device": s.device, "runtime": s.runtime, "status": "resumed",
                "config": done[0]["config"], "predicted": done[0]["predicted"],
                "measured": done[0]["measured"],
                "search_status": (done[0]["measured"] or {}).get("search_status")}
    try:
        device = inventory.open_device(s.device, devs)
    except DeviceError as e:
        failures.append((name, f"{e.kind}: {e}"))
        return {"model": s.model, "device": s.device, "runtime": s.runtime, "status": "failed"}
    try:
        # reuse_costs: history joins, scaled to tonight
        res = run_search(s.ref, device, s.runtime, s.options, protocol=cfg.protocol,
                         work_dir=artifacts_dir / "search", store=store, run_id=run_id,
                         progress=say)
        if res.status in ("failed", "infeasible"):
            failures.append((name, f"{res.status}: {res.message}"))
        elif res.status == "budget_missed":
            say(f"{name}: BUDGET MISSED: {res.message}")
        else:
            say(f"{name}: predicted {res.predicted['latency_ms']:.3f} ± "
                f"{res.predicted['latency_sd_ms']:.3f} ms, measured "
                f"{res.measured['latency_ms']:.3f} ± {res.measured['latency_ci_ms']:.3f} ms "
                f"within the budget {res.resolved_budgets['latency_ms']:.3f} ms "
                f"({len(res.iterations)} iteration(s))" + (f"; {res.message}" if res.message else ""))
        if res.config and res.variant and res.status != "failed":
            _debug_pick(cfg, store, run_id, s, res, artifacts_dir, say)
        d = res.to_dict()
        d.pop("cost_table", None)
        return d
    except Exception as e:  # noqa: BLE001 — recorded, the nightly goes on
        failures.append((name, one_line(e)))
        say(f"{name}: failed: {one_line(e)}")
        traceback.print_exc()
        return {"model": s.model, "device": s.device, "runtime": s.runtime, "status": "failed"}
    finally:
        device.close()


def _debug_pick(cfg: Config, store, run_id: str, s: Search, res, artifacts_dir: Path, say
                ) -> None:
    """The debug verb on the searched configuration, on the same device and runtime: where
    its error comes from, layer by layer, kept with the chosen allocation for the report. A
    failure here is a note, not a failed search."""
    from hilq.quant.options import ExportOptions

    from .debug import DebugOptions, debug
    from .latmodel import FLOAT

    if all(v == FLOAT for v in res.config.values()):
        say(f"debug {s.model} on {s.device}/{s.runtime}: the pick is all float, nothing "
            "quantized to debug")
        return
    try:
        options = DebugOptions(model=s.ref, variant=res.variant, device=s.device,
                               runtime=s.runtime, inventory=cfg.inventory, samples=32,
                               build=ExportOptions(calib_data=s.calib_data, seed=cfg.seed,
                                                   distill_iters=s.options.distill_iters))
        # the search's own work folder: its artifact of the pick is reused from the cache
        result, _ = debug(options, artifacts_dir / "search")
    except Exception as e:  # noqa: BLE001
        say(f"debug {s.model} on {s.device}/{s.runtime}: not run: {one_line(e)}")
        return
    chosen = next((r for r in store.rows("allocations", run_id) if r["name"] == "chosen"
                   and (r["model"], r["device"], r["runtime"]) == (s.model, s.device,
                                                                    s.runtime)), None)
    if chosen is not None:
        store.set_allocation_measured(run_id, s.model, s.device, s.runtime, "chosen",
                                      {**(chosen["measured"] or {}), "debug": result})
    worst = result["layers"][0] if result.get("layers") else {}
    say(f"debug {s.model} on {s.device}/{s.runtime}: worst layer {worst.get('layer')} "
        f"({worst.get('sqnr_db') or worst.get('sqnr_db_simulated'):.1f} dB), error introduced "
        f"most at {', '.join(result.get('culprits', [])[:1]) or '–'}")
