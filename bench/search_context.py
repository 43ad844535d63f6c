"""What every phase of one search shares (`Context`): the model, its layers and edges, the
device, the artifacts built so far, and the timings of the profile patterns; and how stored
variants map back to configurations (`precisions_of`, `batch_of`, `history`).
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hilq.quant.artifact import file_stem
from hilq.quant.spec import DISTILL_ITERS, BitConfig, SpecError

from hilq.measurement import Measurement, Protocol

from . import latmodel, loop, runner
from .latmodel import FLOAT, INT8

PROFILE_ITERS = 20


def median_p50(ms: list[Measurement]) -> float | None:
    vals = _p50s(ms)
    return statistics.median(vals) if vals else None


def _p50s(ms: list[Measurement]) -> list[float]:
    return [m.latency_ms["p50"] for m in ms if m.ok and m.latency_ms.get("p50") is not None]


def _write_config(work: Path, name: str, config: BitConfig) -> str:
    # a model given as a path (`models/det.onnx`) names a file here, not a folder
    path = work / f"{file_stem(name)}.json"
    path.write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
    return f"config:{path}"


def precisions_of(bit_config: dict | None, layers) -> dict[str, str] | None:
    """A stored BitConfig dict -> {layer: w8a8 | fp32}, or None if it holds anything else
    (another bit width: not a point of this search's two-precision model)."""
    if bit_config is None:
        return None
    out = {}
    for lay in layers:
        spec = bit_config.get(lay)
        if spec is None:
            out[lay] = FLOAT
        elif (spec.get("weight") or {}).get("bits") == 8 and (spec.get("act") or {}).get("bits") == 8:
            out[lay] = INT8
        else:
            return None
    return out if set(bit_config) <= set(layers) else None


def batch_of(variant: str) -> tuple[str, str]:
    """A stored search variant -> (batch, name): `it<N>-<name>` was the search's N-th
    measurement (`Context.measure`), anything else batch "0" (the patterns)."""
    it = re.match(r"it(\d+)-(.*)", variant)
    return (it.group(1), it.group(2)) if it else ("0", variant)


def history(store, model: str, device: str, runtime: str, layers, protocol: Protocol,
            exclude_run: str | None) -> list[latmodel.Observation]:
    """Earlier nights' whole-network timings of two-precision configs under the same batch
    and threads. Within a night each batch (the patterns, each iteration's pick beside the
    uniforms, a Δ table) is put on the scale of that night's patterns
    (`latmodel.on_one_scale`); each night is then scaled by its all-INT8 latency relative
    to the newest night's: a uniformly slower machine moves its data onto one scale, not
    into the layer costs."""
    per_run: dict[str, dict[str, tuple[dict, list[float]]]] = {}
    for r in store.config_latencies(model, device, runtime):
        p = r["protocol"] or {}
        if r["run_id"] == exclude_run or p.get("batch", 1) != protocol.batch or \
                p.get("threads", 0) != protocol.threads or p.get("profile_iters"):
            continue
        cfg = precisions_of(r["bit_config"], layers)
        if cfg is None:
            continue
        key = f"{r['kind']}/{batch_of(r['variant'])[0]}:{r['variant']}"
        per_run.setdefault(r["run_id"], {}).setdefault(key, (cfg, []))[1].append(r["p50_ms"])
    q = dict.fromkeys(layers, INT8)
    nights = {}
    for run, rows in per_run.items():
        obs, _ = latmodel.on_one_scale(rows, "search/0")
        int8 = [o for o in loop.pooled(obs) if o.config == q]
        if int8:
            nights[run] = (int8[0].latency_ms, obs)
    if not nights:
        return []
    ref = nights[max(nights)][0]       # run ids sort by time
    return [latmodel.Observation(ob.config, ref / q_ms * ob.latency_ms, ref / q_ms * ob.se_ms,
                                 f"{run}:{ob.name}")
            for run, (q_ms, obs) in nights.items() for ob in obs]


@dataclass
class Context:
    """What every phase of one search shares: the model, its layers and edges, the device,
    the artifacts built so far (one per configuration), tonight's timed patterns and the
    latency model's prior and history."""

    model: str
    entry: object
    folded: object
    layers: list
    edges: list
    device: object
    runtime: str
    protocol: Protocol
    work: Path
    store: object
    run_id: str | None
    rounds: int
    seed: int
    progress: Callable[[str], None]
    built: dict = field(default_factory=dict)
    batches: int = 0
    ref: object = None              # the quant.models.ModelRef, when not a plain name
    calib_data: str = "real"
    distill_iters: int = DISTILL_ITERS    # the search's, for its distilled artifacts too
    device_accuracy: dict = field(default_factory=dict)   # config key -> accuracy on the device
    graph: object = None            # quant.graph_route.GraphModel: an ONNX-route file

    @property
    def tag(self) -> str:
        return f"{self.model}-{self.device.name}-{self.runtime}"

    def bit_config(self, cfg: dict) -> BitConfig:
        from hilq.quant.sensitivity import config_from_allocation

        if self.graph is not None:
            return self.graph.bit_config({k: v for k, v in cfg.items() if v != FLOAT})
        return config_from_allocation(self.folded, {k: v for k, v in cfg.items() if v != FLOAT},
                                      act_bits=8)

    def artifact(self, cfg: dict):
        key = tuple(sorted(cfg.items()))
        if key not in self.built:
            if all(v == INT8 for v in cfg.values()):
                variant = INT8
            elif all(v == FLOAT for v in cfg.values()):
                variant = FLOAT
            else:
                variant = _write_config(self.work, f"{self.tag}-{len(self.built)}",
                                        self.bit_config(cfg))
            self.built[key] = runner.artifact_for(self.ref or self.model, variant, self.work,
                                                  self.runtime, seed=self.seed,
                                                  calib_data=self.calib_data,
                                                  distill_iters=self.distill_iters)
        return self.built[key]

    def accuracy(self, cfg: dict) -> dict:
        """A configuration's simulated accuracy as its artifact's manifest recorded it when
        it was built (built here if it was not; nothing is quantized twice): top-1 or
        agreement where the model outputs class scores, else its SQNR and the task figures
        of its outputs (a detector's agreement over a box tensor would mean nothing); a
        user's metric beside either."""
        sim = self.artifact(cfg).manifest.get("simulated") or {}
        figures = {k: sim[k] for k in ("task", "metric") if sim.get(k)}
        if sim.get("top1") is not None:
            fp32 = self._simulated(dict.fromkeys(self.layers, FLOAT)).get("top1")
            if fp32 is not None:
                return {"top1": sim["top1"], "fp32_top1": fp32, **figures}
        if sim.get("agreement_fp32") is not None:
            return {"agreement_fp32": sim["agreement_fp32"], **figures}
        if sim:
            return {k: sim[k] for k in ("sqnr_db", "task", "metric") if sim.get(k)}
        if self.graph is not None:
            return {}
        return _accuracy(self.entry, self.bit_config(cfg), self.calib_data)

    def _simulated(self, cfg: dict) -> dict:
        art = self.built.get(tuple(sorted(cfg.items())))
        return (art.manifest.get("simulated") or {}) if art is not None else {}

    def measure(self, configs: dict[str, dict]) -> dict[str, list[float]]:
        """Time configurations beside each other (alternating rounds, fresh processes,
        stored): each one's p50 per good round."""
        self.batches += 1
        named = {f"it{self.batches}-{n}": self.artifact(c) for n, c in configs.items()}
        ms = runner.measure_artifacts(self.device, self.runtime, self.model, named,
                                      self.protocol, rounds=self.rounds, store=self.store,
                                      run_id=self.run_id, kind="search",
                                      on_result=self.progress)
        for n, c in configs.items():
            acc = next((m.accuracy for m in ms[f"it{self.batches}-{n}"] if m.accuracy), None)
            if acc:
                self.device_accuracy[tuple(sorted(c.items()))] = acc
        return {n: _p50s(ms[f"it{self.batches}-{n}"]) for n in configs}


def measure_patterns(ctx: Context):
    """Time the profile patterns beside each other, then profile each: (tonight's timings
    name -> (config, p50 per round), the prior), or (None, why) when a baseline failed."""
    pats = latmodel.profile_patterns(ctx.layers)
    arts = {name: ctx.artifact(cfg) for name, cfg in pats.items()}
    ctx.progress(f"{ctx.model}: timing and profiling {len(pats)} patterns on "
                 f"{ctx.device.name}/{ctx.runtime}")
    timed = runner.measure_artifacts(ctx.device, ctx.runtime, ctx.model, arts, ctx.protocol,
                                     rounds=ctx.rounds, store=ctx.store, run_id=ctx.run_id,
                                     kind="search", on_result=ctx.progress)
    seeded = {n: (pats[n], _p50s(timed[n])) for n in pats}
    uniforms = ("uniform-" + INT8, "uniform-" + FLOAT)
    if not all(seeded[n][1] for n in uniforms):
        return None, "the uniform baselines failed on the device: " + "; ".join(
            m.reason or "" for n in uniforms for m in timed[n] if not m.ok)
    profiles = runner.profile_artifacts(ctx.device, ctx.runtime, ctx.model, arts, ctx.protocol,
                                        iters=PROFILE_ITERS, store=ctx.store, run_id=ctx.run_id,
                                        on_result=ctx.progress)
    have = [(n, profiles[n].profile) for n in pats if profiles[n].ok and profiles[n].profile]
    if not have:
        why = next((m.reason for m in profiles.values() if m.reason), "no profile")
        ctx.progress(f"{ctx.model}: no engine profile ({why}): a flat prior, the measurements "
                     "carry the fit")
        base = statistics.median(seeded["uniform-" + INT8][1])
        return seeded, latmodel.flat_prior(ctx.layers, ctx.edges, base)
    wall = {i: statistics.median(seeded[n][1]) for i, (n, _) in enumerate(have) if seeded[n][1]}
    return seeded, latmodel.prior_from_profiles(ctx.layers, ctx.edges,
                                                [(pats[n], p) for n, p in have], wall)


def float_edges(model, layers: list[str]) -> list[tuple[str, str]]:
    """(producer, consumer) pairs of quantizable layers joined by a tensor path through
    non-quantizable ops only (ReLU, pooling, residual adds, flatten): where a Q/DQ pair sits
    between two INT8 layers and none between two float ones."""
    import torch.fx as fx
    from hilq.quant.transform import layer_graph

    graph = layer_graph(model)
    wanted = set(layers)
    producers: dict[fx.Node, set[str]] = {}
    edges = []
    for node in graph.nodes:
        ins = {p for a in node.all_input_nodes for p in producers.get(a, ())}
        if node.op == "call_module" and node.target in wanted:
            edges += [(p, node.target) for p in sorted(ins)]
            producers[node] = {node.target}
        else:
            producers[node] = ins
    return edges



def _float_size(model, layer: str) -> int:
    m = model.get_submodule(layer)
    return sum(p.numel() for p in m.parameters()) * 32



def _check_runtime(runtime: str) -> None:
    """The search chooses between float and the runtime's INT8 kernels per layer; a runtime
    without INT8 kernels for convolutions and linear layers has nothing to choose from."""
    import importlib

    from hilq.devices.runtimes import module_name

    offered = importlib.import_module(f"hilq.devices.runtimes.{module_name(runtime)}").precisions()
    missing = [kind for kind in ("conv", "linear") if INT8 not in offered.get(kind, ())]
    if missing:
        raise SpecError(f"runtime {runtime} has no {INT8} kernels for {', '.join(missing)} "
                        "layers: nothing to search over")


def _accuracy(entry, config: BitConfig, calib_data: str = "real") -> dict:
    """Top-1 on labelled data through the fake-quant model (ONNX Runtime agrees with it within
    0.3 pt: see the export tests), else top-1 agreement with the float model."""
    import torch
    from hilq.quant.pipeline import quantize_model
    from hilq.quant.spec import DISTILL_ITERS

    res = quantize_model(entry, config, calib_data=calib_data, distill_iters=DISTILL_ITERS)
    if res.quant_top1 is not None:
        return {"top1": res.quant_top1, "fp32_top1": res.fp32_top1}
    data = entry.data()
    with torch.no_grad():
        q = res.qmodel(data.test_x).argmax(-1)
        f = res.fmodel(data.test_x).argmax(-1)
    return {"agreement_fp32": float((q == f).float().mean())}



