"""The data door for an ONNX file, by input name: what its inputs are fed with.

A file may have several inputs, and not all of them are images: a recurrent state, a sample
rate, token ids. `load_feeds(entry, data)` returns `Feeds`:

- `.npz` keyed by input name: an array shaped like the input with N samples on its batch
  axis (axis 0) is per-sample; one shaped exactly like the input (a state, a scalar sample
  rate) is fixed, fed as it is to every run; `labels` (or `y`) optional. The samples are
  split alternately into calibration and test, as the image door does;
- a `package.module:factory` returning such a dict (or `quant.models.Data`);
- anything the image door reads (a folder of images, `.npy`, `.npz` with `x`/`y`), for a
  file with one input;
- nothing: seeded inputs for the reference check and timing only (no calibration data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DataError

RANDOM_SAMPLES = 8   # seeded samples of a file given no data: reference outputs only


@dataclass(frozen=True)
class Feeds:
    """Inputs by name. `calib`/`test` hold per-sample inputs (N on axis 0), `fixed` the
    inputs fed whole to every run; `calib` is empty when there is no calibration data."""

    calib: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    fixed: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None
    name: str = ""
    data_free: bool = False

    def all_calib(self) -> dict[str, np.ndarray]:
        return self.calib or self.test

    def __len__(self) -> int:
        return len(next(iter(self.test.values()))) if self.test else 0


def load_feeds(entry, data: str | None, preprocess=None, seed: int = 0) -> Feeds:
    """The feeds for `entry` (a `ModelEntry` with `inputs`); one line naming the problem."""
    if data is None:
        return _seeded(entry.inputs, seed)
    arrays = _named_arrays(data, entry.inputs)
    if arrays is None:      # the image door: one input
        if len(entry.inputs) != 1:
            raise DataError(f"{data}: {entry.name} has {len(entry.inputs)} inputs "
                            f"({', '.join(i.name for i in entry.inputs)}); give an .npz keyed "
                            "by input name, or a factory returning such a dict")
        d = entry.data()
        inp = entry.inputs[0]
        calib = {inp.name: _np(d.calib_x)} if d.calib_x is not None else {}
        return Feeds(calib, {inp.name: _np(d.test_x)}, labels=None if d.test_y is None
                     else _np(d.test_y).astype(np.int64), name=d.name or str(data))
    return _split(arrays, entry.inputs, str(data))


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _seeded(inputs, seed: int) -> Feeds:
    rng = np.random.default_rng(seed)
    test, fixed = {}, {}
    for inp in inputs:
        batched = inp.shape and (len(inputs) == 1 or inp.file_dims[0] is None)
        if batched:
            test[inp.name] = _random(rng, (RANDOM_SAMPLES, *inp.shape[1:]), inp.dtype)
        else:   # a scalar, or a state whose leading axis is not the batch
            fixed[inp.name] = _random(rng, inp.shape, inp.dtype)
    return Feeds({}, test, fixed, name="none", data_free=True)


def _random(rng, shape, dtype: str) -> np.ndarray:
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.integers(0, 8, size=shape).astype(dtype)


def _named_arrays(data: str, inputs) -> dict | None:
    """An `.npz` or factory keyed by input names as a dict; None for the image door."""
    names = {i.name for i in inputs}
    if ":" in data and not Path(data).exists():
        from .data import import_factory

        obj = import_factory(data)()
        if isinstance(obj, dict) and names & set(obj):
            return {k: np.asarray(_np(v)) for k, v in obj.items()}
        return None
    path = Path(data)
    if path.suffix != ".npz" or not path.is_file():
        return None
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return arrays if names & set(arrays) else None


def _split(arrays: dict, inputs, name: str) -> Feeds:
    """Per-sample and fixed inputs from arrays by name, split alternately into calib/test."""
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise DataError(f"{name}: no array for input {missing[0]!r} (has "
                        f"{', '.join(sorted(arrays))})")
    per, fixed = {}, {}
    for inp in inputs:
        a = arrays[inp.name]
        if tuple(a.shape) == tuple(inp.shape) and (not inp.shape or len(inputs) > 1):
            fixed[inp.name] = a.astype(inp.dtype)
        elif a.ndim == len(inp.shape) and tuple(a.shape[1:]) == tuple(inp.shape[1:]):
            per[inp.name] = a.astype(inp.dtype)
        else:
            raise DataError(f"{name}: input {inp.name} is {list(a.shape)}; the model takes "
                            f"{list(inp.shape)} (N samples on axis 0, or exactly that shape "
                            "for an input fixed across samples)")
    if not per:
        raise DataError(f"{name}: every input is fixed; at least one needs N samples on axis 0")
    counts = {len(v) for v in per.values()}
    if len(counts) != 1:
        raise DataError(f"{name}: per-sample inputs disagree on the number of samples "
                        f"({sorted(counts)})")
    n = counts.pop()
    labels = arrays.get("labels", arrays.get("y"))
    if labels is not None and len(labels) != n:
        raise DataError(f"{name}: {len(labels)} labels for {n} samples")
    if n < 2:
        raise DataError(f"{name}: {n} sample; calibration and test need at least 2")
    calib = {k: v[0::2] for k, v in per.items()}
    test = {k: v[1::2] for k, v in per.items()}
    return Feeds(calib, test, fixed, None if labels is None else
                 np.asarray(labels)[1::2].astype(np.int64), name=Path(name).name)


def named_data(data: str, inputs):
    """`quant.models.Data` for the PyTorch route of a one-input file whose data is keyed by
    input name (an `.npz` or factory dict); None when the data is for the image door."""
    import torch

    from .data import Data

    arrays = _named_arrays(data, inputs) if len(inputs) == 1 else None
    if arrays is None:
        return None
    feeds = _split(arrays, inputs, str(data))
    name = inputs[0].name
    return Data(calib_x=torch.from_numpy(feeds.calib[name]),
                test_x=torch.from_numpy(feeds.test[name]),
                test_y=None if feeds.labels is None else torch.from_numpy(feeds.labels),
                name=feeds.name)
