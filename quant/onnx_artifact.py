"""Artifacts of a user's ONNX file without PyTorch: the FP32 file as it is, and the files the
ONNX route (`quant.graph_route`) quantizes.

Benchmarking a file needs the engine and a static shape per input, nothing else: the FP32
artifact is the file, byte for byte, with a manifest naming each input's shape (the engines
fix the file's dynamic dimensions there) and an evaluation set whose reference outputs are
the file's own, computed by ONNX Runtime on the host. Its outputs are classified once
(`hilq.accuracy.output_kind`) so that every device judges them by a figure that fits.
Integer variants take the PyTorch route (`quant.export`) where onnx2torch converts the file,
else the ONNX route (`route_of` decides; the manifest's `settings.route` records it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .onnx_feeds import Feeds
from .onnx_run import run, session
from .options import ROUTES

REFERENCE_SAMPLES = 8
# the wrong-answer check of an ONNX-route INT8 file: a broken engine misses its reference by
# a large share of the output's range; another engine's rounding ties (a step of the last
# integer layer: 0.11 of a probability on PP-OCR's angle classifier, OpenVINO vs ORT) do not
GROSS = 0.25


def input_fields(entry) -> dict:
    """The manifest's description of the inputs: all of them, and the first in the fields
    single-input readers know."""
    first = entry.inputs[0]
    return {"inputs": [i.to_dict() for i in entry.inputs],
            "input_shapes": {i.name: list(i.shape) for i in entry.inputs},
            "input_shape": list(first.shape), "input_name": first.name,
            "input_dtype": first.dtype}


def reference_and_evalset(path: Path, entry, feeds: Feeds, out_dir: Path, model: str,
                          fp32_path: str | Path, seed: int, metric: str | None = None) -> dict:
    """The manifest fields for the agent's two checks, both computed here on the host:

    - `<file>.reference.npz`: a few test samples and this file's outputs run by ONNX
      Runtime with every optimisation off, Q/DQ executed as written: the simulation of the
      graph (what hilq's fake-quant model is to the PyTorch route), and
      `reference_ort_max_abs_diff`, how far ORT's own optimized kernels land from it;
    - the shared evaluation set: test inputs, the FP32 file's outputs and their kinds,
      labels; `simulated`: the simulation's figures on it."""
    from hilq.accuracy import evaluate, output_kind

    from . import evalset

    n = len(feeds)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:REFERENCE_SAMPLES])
    sample = {k: v[idx] for k, v in feeds.test.items()}
    simulation = session(str(path))
    outs = run(simulation, entry.inputs, sample, feeds.fixed)
    fast = run(session(str(path), optimize=True), entry.inputs, sample, feeds.fixed)
    dev = max((float(np.abs(a.astype(np.float64) - b).max(initial=0))
               for a, b in zip(outs, fast) if a.shape == b.shape), default=0.0)
    ref = Path(str(path) + ".reference.npz")
    np.savez(ref, **{f"input:{k}": v for k, v in sample.items()},
             **{f"fixed:{k}": v for k, v in feeds.fixed.items()},
             **{f"output:{i}": o for i, o in enumerate(outs)})
    fp32 = run(session(str(fp32_path)), entry.inputs, feeds.test, feeds.fixed)
    kinds = [output_kind(o) for o in fp32]
    arrays = {**{f"input:{k}": v for k, v in feeds.test.items()},
              **{f"fixed:{k}": v for k, v in feeds.fixed.items()},
              **{f"fp32:{i}": o for i, o in enumerate(fp32)},
              **{f"kind:{i}": np.array(k) for i, k in enumerate(kinds)}}
    if feeds.labels is not None:
        arrays["labels"] = feeds.labels
    arrays.update(evalset.metric_arrays(metric))
    ev = evalset.write(out_dir, arrays, model, feeds.name)
    sim = evaluate(run(simulation, entry.inputs, feeds.test, feeds.fixed), arrays)
    quantized = Path(path).resolve() != Path(fp32_path).resolve()
    atol = {"reference_atol": GROSS * min(float(np.abs(o).max()) or 1.0 for o in outs)} \
        if quantized else {}
    return {"reference": ref.name, "reference_ort_max_abs_diff": dev, **atol,
            "output_kinds": kinds,
            "eval_set": {"file": Path(ev.path).name, "sha256": ev.sha256,
                         "n": ev.manifest["n"], "labels": ev.manifest["labels"],
                         "data": feeds.name},
            "simulated": {k: sim[k] for k in ("n", "top1", "agreement_fp32", "kl", "sqnr_db",
                                              "cosine", "task", "metric", "metric_error")
                          if k in sim}}


def file_artifact(entry, feeds: Feeds, path: Path, *, model: str, variant: str, target: str,
                  settings: dict, versions: dict, seed: int, metric: str | None = None
                  ) -> Artifact:
    """The user's FP32 file as its own artifact, copied as it is (no PyTorch involved)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(entry.onnx_path, tmp)
    os.replace(tmp, path)
    proto = onnx.load(str(path), load_external_data=False)
    fields = reference_and_evalset(path, entry, feeds, path.parent, model, path, seed, metric)
    settings = {**settings, "route": "file", "source_onnx": entry.onnx_path,
                "opset": max((o.version for o in proto.opset_import
                              if o.domain in ("", "ai.onnx")), default=None)}
    return Artifact.create(
        path, model=model, variant=variant, target=target, format="onnx-fp32",
        bit_config={}, **input_fields(entry), output_names=[o.name for o in proto.graph.output],
        versions=versions, settings=settings, layer_map={}, runtimes=["ort", "openvino"],
        **fields)




def build(entry, ref, v, out_dir, target: str, settings: dict, versions: dict, seed: int,
          cache_key, route: str = "auto") -> Artifact | None:
    """An ONNX file's artifact where it needs no PyTorch: the FP32 variant (the file
    itself), and integer variants on the ONNX route (`route="onnx"`, or `auto` when
    onnx2torch cannot convert the file); None where the PyTorch route builds it.
    `cache_key(extra)` is the artifact's path for these settings."""
    from .assembly import cached
    from .onnx_feeds import load_feeds
    from .spec import ExportError

    if route not in ROUTES:
        raise ExportError(f"route {route!r}: use {', '.join(ROUTES)}")
    if v.is_float:
        if v.float_dtype != "fp32":     # a TensorRT builder flag, not in the file
            settings = {**settings, "engine_precision": v.float_dtype}
        path = cache_key({"route": "file", **settings})
        if cached(path):
            return Artifact.load(path)
        feeds = load_feeds(entry, ref.data, ref.preprocess, seed)
        return file_artifact(entry, feeds, path, model=entry.name, variant=v.name,
                             target=target, settings=settings, versions=versions, seed=seed,
                             metric=ref.metric)
    if target == "torch":
        return None
    taken, why = route_of(entry, route)
    if taken == "torch":
        return None
    path = cache_key({"route": "onnx", **settings})
    if cached(path):
        return Artifact.load(path)
    feeds = load_feeds(entry, ref.data, ref.preprocess, seed)
    return graph_artifact(entry, feeds, v, path, target=target, settings=settings,
                          versions=versions, seed=seed, why=why, metric=ref.metric)


def route_of(entry, route: str = "auto") -> tuple[str, str]:
    """("torch", "") where the PyTorch route builds this file's integer variants, else
    ("onnx", why): asked for, or onnx2torch cannot take the file (its own one line)."""
    from .models.onnx_file import NotConvertible

    if route == "torch" or not entry.onnx_path:
        return "torch", ""
    if route == "onnx":
        return "onnx", "asked for (--route onnx)"
    st = os.stat(entry.onnx_path)
    key = (entry.onnx_path, st.st_mtime_ns, st.st_size)
    if key not in _CONVERTS:        # a search builds dozens of artifacts of one file
        try:
            entry.build()
            _CONVERTS[key] = ("torch", "")
        except NotConvertible as e:
            _CONVERTS[key] = ("onnx", str(e))
    return _CONVERTS[key]


_CONVERTS: dict[tuple, tuple[str, str]] = {}


def graph_artifact(entry, feeds: Feeds, v, path: Path, *, target: str, settings: dict,
                   versions: dict, seed: int, why: str, metric: str | None = None) -> Artifact:
    """The file quantized on its own graph (`quant.graph_route`), Q/DQ as hilq exports."""
    import onnx

    from . import graph_route
    from .assembly import target_config
    from .spec import variant_config

    proto = graph_route.normalise(entry.onnx_path, str(path.parent))
    found = graph_route.layers(proto)
    if not found:
        raise graph_route.GraphRouteError(
            f"{entry.onnx_path}: no Conv, Gemm or MatMul with constant weights to quantize "
            "(fp32 still benchmarks)")
    config = target_config(variant_config(v, list(found), granularity=settings["granularity"],
                                          calib=settings["calib"],
                                          group_size=settings["group_size"]), target)
    qproto, info = graph_route.quantize(proto, config, entry.inputs, feeds.calib, feeds.fixed,
                                        act_dtype=settings["act_dtype"],
                                        placement="tensorrt" if target == "tensorrt" else "ort",
                                        repairs=tuple(settings.get("repairs") or ()))
    onnx.checker.check_model(qproto)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(qproto, str(tmp))
    os.replace(tmp, path)
    fields = reference_and_evalset(path, entry, feeds, path.parent, entry.name,
                                   entry.onnx_path, seed, metric)
    settings = {**settings, "route": "onnx", "route_reason": why,
                "normalised_by": "onnxruntime basic offline optimisation",
                "source_onnx": entry.onnx_path, "calib_samples": len(
                    next(iter(feeds.calib.values()))) if feeds.calib else 0,
                "placement": info.get("placement"),
                "extra_tensors_calib": "minmax (float graph)",
                "folded_activations": info.get("folded_activations", []),
                "qparam_conflicts": info.get("qparam_conflicts", [])}
    return Artifact.create(
        path, model=entry.name, variant=v.name, target=target, format="onnx-qdq",
        bit_config=config.to_dict(), **input_fields(entry),
        output_names=[o.name for o in qproto.graph.output], versions=versions,
        settings=settings, layer_map=info["layer_map"],
        runtimes=["ort", "openvino"] + (["tensorrt"] if target == "tensorrt" else []),
        **fields)
