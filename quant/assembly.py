"""What every artifact builder shares (the PyTorch route, a user's ONNX file, the
`torch.export` target): the manifest's versions, TensorRT's grid, the reference outputs the
agent's wrong-answer check compares with, the evaluation set's fields, and the cache of built
artifacts (a file named by a hash of everything that decides its content).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .artifact import Artifact, file_stem
from .spec import BitConfig, LayerPrecision

FORMAT_QDQ, FORMAT_FP32 = "onnx-qdq", "onnx-fp32"
EXPORT_VERSION = 4   # bump when the exported graph changes: it is part of the cache key


def versions() -> dict:
    import onnx

    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    return out


def target_config(config: BitConfig, target: str) -> BitConfig:
    """TensorRT wants symmetric INT8 activations and narrow-range ([-127, 127]) weights."""
    if target != "tensorrt":
        return config
    return BitConfig({n: LayerPrecision(p.weight.with_(narrow_range=True) if p.weight else None,
                                        p.act.with_(symmetric=True) if p.act else None)
                      for n, p in config.layers.items()})


def reference(model: nn.Module, data, path: Path, seed: int, n: int = 8,
               input_name: str = "input") -> Path:
    """`<file>.reference.npz`: a few seeded real inputs and the fake-quant model's outputs,
    what the agent's wrong-answer check compares the engine against."""
    x = data.test_x if data.test_x is not None and len(data.test_x) else data.calib_x
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    xs = x[idx]
    with torch.no_grad():
        out = model.eval()(xs)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    ref = Path(str(path) + ".reference.npz")
    np.savez(ref, **{f"input:{input_name}": xs.numpy()},
             **{f"output:{i}": o.detach().numpy() for i, o in enumerate(outs)})
    return ref


def evaluation_fields(float_model: nn.Module, model: nn.Module | None, data, out_dir: Path,
                      input_name: str, name: str, metric: str | None = None,
                      kind: str | None = None) -> dict:
    """Manifest fields for accuracy on the device: `eval_set` (the shared evaluation set
    beside the artifact: file, sha256, n, labels) and `simulated` (this model's figures on
    it, the fake-quant side of the simulated-vs-device comparison; absent when `model` is
    None); {} without test data."""
    from . import evalset

    arrays = evalset.arrays(float_model, data, input_name, kind)
    if arrays is None:
        return {}
    arrays.update(evalset.metric_arrays(metric))
    ev = evalset.write(out_dir, arrays, name, data.name)
    return {"output_kinds": [str(arrays["kind:0"])],
            "eval_set": {"file": Path(ev.path).name, "sha256": ev.sha256,
                         "n": ev.manifest["n"], "labels": ev.manifest["labels"],
                         "data": data.name},
            **({"simulated": evalset.simulated(model, arrays)} if model is not None else {})}


def ort_deviation(path: Path, ref: Path) -> float | None:
    """Max |ORT − fake-quant| on the reference inputs (ORT's default kernels, here): a
    measured scale for the agent's wrong-answer tolerance, not a guarantee on other CPUs."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    with np.load(ref) as r:
        so = ort.SessionOptions()
        so.log_severity_level = 3   # host-side helper: errors only, not graph warnings
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = r[f"input:{inp.name}"]
        step = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)   # a static batch
        parts = [sess.run(None, {inp.name: x[i:i + step]}) for i in range(0, len(x), step)]
        got = [np.concatenate(outs) for outs in zip(*parts)]
        return max(float(np.abs(g - r[f"output:{i}"]).max()) for i, g in enumerate(got))


def cache_path(out_dir, model: str, variant: str, target: str, v, blob: dict) -> Path:
    """Where the artifact for everything in `blob` lives: a hash of it in the name."""
    blob = {**blob, "model": model, "variant": variant}
    if v.config_path:
        blob["config"] = Path(v.config_path).read_text()
    key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]
    stem = f"{file_stem(model)}-{file_stem(variant)}"
    return Path(out_dir) / f"{stem}-{target}-{key}.onnx"


def cached(path: Path) -> bool:
    """A built artifact whose file still matches its manifest (a corrupt one is rebuilt)."""
    if not (path.is_file() and Path(str(path) + ".manifest.json").is_file()):
        return False
    try:
        Artifact.load(path)
        return True
    except ValueError:
        return False
