"""The evaluation set that travels to the device: the model's test inputs (preprocessed once,
here), their labels, and the FP32 model's outputs, in one content-addressed `.npz`.

Every variant of a model shares it, so a device receives it once (cached by sha256 like an
artifact) and every figure measured on it names the same sha256. The arrays are written
with fixed zip timestamps: the same data gives the same bytes, hence the same sha256, night
after night, which is what lets accuracy be compared across nights.
The figures themselves are `devices/accuracy.py`'s, on the host (the fake-quant model's
`simulated` figures, in the manifest) and on the device (the engine's) alike.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from .artifact import Artifact


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.asarray(arrays[name], order="C"),
                                      allow_pickle=False)
            z.writestr(info, arr.getvalue())
    return buf.getvalue()


def arrays(float_model, data, input_name: str, kind: str | None = None
           ) -> dict[str, np.ndarray] | None:
    """The evaluation set's arrays for `data.test_x` (None without test inputs); `kind`:
    what the output is, where the model declares it (else judged from its values)."""
    import torch

    from .evaluate import logits

    x = data.test_x
    if x is None or not len(x):
        return None
    from hilq.accuracy import output_kind

    fp32 = logits(float_model, x).detach().float().numpy()
    out = {f"input:{input_name}": x.numpy(), "fp32:0": fp32,
           "kind:0": np.array(kind or output_kind(fp32))}
    if data.test_y is not None:
        out["labels"] = torch.as_tensor(data.test_y).long().numpy()
    return out


def metric_arrays(spec: str | None) -> dict[str, np.ndarray]:
    """`module:function` (or `path/to/file.py:function`) -> the arrays that carry the user's
    metric inside the evaluation set (its module's source and the function's name); {} for
    None. The module must stand alone (it is run from its source on the device)."""
    import importlib.util

    from .spec import ModelError

    if not spec:
        return {}
    module, _, fn = spec.rpartition(":")
    if not module or not fn:
        raise ModelError(f"--metric {spec!r}: expected package.module:function")
    path = Path(module) if module.endswith(".py") else None
    if path is None:
        import os
        import sys

        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        path = Path(found.origin) if found is not None and found.origin else None
    if path is None or not path.is_file():
        raise ModelError(f"--metric {spec!r}: cannot find module {module!r}")
    source = path.read_text()
    scope: dict = {"__name__": "hilq_user_metric"}
    try:
        exec(compile(source, str(path), "exec"), scope)
    except Exception as e:  # noqa: BLE001 — the user's module: its error, in one line
        raise ModelError(f"--metric {spec!r}: {path} does not run on its own: "
                         f"{type(e).__name__}: {e}") from None
    if not callable(scope.get(fn)):
        raise ModelError(f"--metric {spec!r}: {path} has no function {fn!r}")
    return {"metric:source": np.array(source), "metric:function": np.array(fn)}


def write(out_dir: str | Path, arrays: dict[str, np.ndarray], model: str, data_name: str
          ) -> Artifact:
    """`<out_dir>/evalset-<sha16>.npz` (reused when present) as an Artifact whose manifest
    says what it holds."""
    blob = _npz_bytes(arrays)
    sha = hashlib.sha256(blob).hexdigest()
    path = Path(out_dir) / f"evalset-{sha[:16]}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".part-{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    n = len(next(v for k, v in arrays.items() if k.startswith("input:")))
    return Artifact.create(path, kind="evalset", model=model, data=data_name, n=n,
                           labels="labels" in arrays)


def load(artifact: Artifact) -> Artifact | None:
    """The evaluation set an artifact's manifest names, beside it; None when it has none
    or the file is gone (then there is no device accuracy, not a failure)."""
    name = (artifact.manifest.get("eval_set") or {}).get("file")
    path = Path(artifact.path).parent / name if name else None
    if path is None or not path.is_file():
        return None
    try:
        return Artifact.load(path)
    except (OSError, ValueError):
        return None


def simulated(model, ev: dict[str, np.ndarray]) -> dict:
    """The fake-quant (or float) model's figures on the evaluation set: what the device's
    figures are compared with."""
    import torch

    from hilq.accuracy import evaluate

    from .evaluate import logits

    x = torch.from_numpy(next(v for k, v in ev.items() if k.startswith("input:")))
    res = evaluate([logits(model, x).detach().float().numpy()], ev)
    return {k: res[k] for k in ("n", "top1", "agreement_fp32", "kl", "sqnr_db", "cosine",
                                "task", "metric", "metric_error", "per_sample") if k in res}
