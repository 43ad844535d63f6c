"""The data door: a folder of images, `.npy`/`.npz` arrays, or `package.module:factory`.

`load_data(spec, input_shape, preprocess)` returns `quant.models.Data`:

- a folder of images, flat (no labels) or one sub-folder per class (labels are the sorted
  sub-folder names' indices, as torchvision's `ImageFolder`); sub-folders named `calib/` and
  `test/` (or `val/`) give the two splits, otherwise the images are split alternately in
  sorted order (each class contributes to both). Images are decoded by Pillow and
  preprocessed as declared by `Preprocess` (the torchvision vocabulary: resize of the
  shorter side, center crop, scale to [0, 1], mean/std, layout, dtype);
- `.npy`: inputs only; `.npz`: `x` (or `inputs`) and optionally `y` (or `labels`), or the
  splits by name (`calib_x`, `test_x`, `test_y`); arrays are used as they are;
- `package.module:factory`: a function returning `Data` (or a dict with its keys).

The preprocessing is part of an artifact's manifest, so the device gets the same inputs.
Every bad input raises `DataError` with one line naming the file or folder.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .spec import ModelError, SpecError


class DataError(SpecError):
    """Data that cannot be read, or that does not fit the model (the message names it)."""


@dataclass
class Data:
    """Calibration and evaluation data. `test_y` None = no labels (latency-only models)."""

    calib_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor | None = None
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    name: str = ""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input (torchvision's names and order)."""

    resize: int | None = None          # shorter side, bilinear (torchvision's Resize(int))
    crop: int | None = None            # center crop to crop × crop
    mean: tuple[float, ...] = ()       # per channel, after scaling to [0, 1]
    std: tuple[float, ...] = ()
    layout: str = "NCHW"               # NCHW | NHWC
    dtype: str = "float32"             # float32 | uint8 (raw pixels, no scaling)
    mode: str = "RGB"                  # Pillow mode: RGB | L

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


IMAGENET = Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225))


def parse_preprocess(text: str | dict | None) -> Preprocess | None:
    """`"resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW"`,
    `"imagenet"`, or the same keys as a dict (a nightly config)."""
    if text is None or isinstance(text, Preprocess):
        return text
    if text == "imagenet":
        return IMAGENET
    items = text if isinstance(text, dict) else dict(
        kv.split("=", 1) if "=" in kv else (kv, "") for kv in text.split(",") if kv.strip())
    known = Preprocess.__dataclass_fields__
    out = {}
    for k, v in items.items():
        k = k.strip()
        if k not in known:
            raise DataError(f"unknown preprocessing key {k!r} (use {', '.join(known)})")
        try:
            if k in ("resize", "crop"):
                out[k] = int(v)
            elif k in ("mean", "std"):
                out[k] = tuple(float(s) for s in (v if isinstance(v, list) else
                                                  str(v).split("/")))
            else:
                out[k] = str(v)
        except ValueError:
            raise DataError(f"preprocessing {k}={v!r} is not a number") from None
    p = Preprocess(**out)
    if p.layout not in ("NCHW", "NHWC"):
        raise DataError(f"preprocessing layout={p.layout!r}: use NCHW or NHWC")
    if p.dtype not in ("float32", "uint8"):
        raise DataError(f"preprocessing dtype={p.dtype!r}: use float32 or uint8")
    if len(p.mean) != len(p.std):
        raise DataError(f"preprocessing mean has {len(p.mean)} values, std {len(p.std)}")
    return p


def _image_files(folder: Path) -> list[Path]:
    from PIL import Image

    exts = set(Image.registered_extensions())
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)


def _decode(path: Path, p: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(p.mode)
            if p.resize:
                w, h = im.size
                s = p.resize / min(w, h)
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))),
                               Image.Resampling.BILINEAR)
            if p.crop:
                w, h = im.size
                if p.crop > min(w, h):
                    raise DataError(f"{path}: {w}×{h} is smaller than crop={p.crop} "
                                    "(add resize=)")
                left, top = round((w - p.crop) / 2), round((h - p.crop) / 2)
                im = im.crop((left, top, left + p.crop, top + p.crop))
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if p.dtype == "float32":
        a = a.astype(np.float32) / 255.0
        if p.mean:
            if len(p.mean) != a.shape[2]:
                raise DataError(f"preprocessing mean has {len(p.mean)} values for "
                                f"{a.shape[2]}-channel images ({path})")
            a = (a - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return a.transpose(2, 0, 1) if p.layout == "NCHW" else a


def _images(files: list[Path], p: Preprocess) -> torch.Tensor:
    arrays = [_decode(f, p) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images in {files[0].parent} decode to different shapes "
                        f"{sorted(shapes)[:3]}: add resize= and crop=")
    return torch.from_numpy(np.stack(arrays))


def _labelled(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, classes): one sub-folder per class, or a flat folder (labels -1)."""
    subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subs:
        files, labels = [], []
        for k, d in enumerate(subs):
            fs = _image_files(d)
            files += fs
            labels += [k] * len(fs)
        return files, labels, [d.name for d in subs]
    fs = _image_files(folder)
    return fs, [-1] * len(fs), []


def image_folder(folder: Path, p: Preprocess | None) -> Data:
    p = p or Preprocess()
    splits = {d.name: d for d in folder.iterdir() if d.is_dir()} if folder.is_dir() else {}
    test_dir = splits.get("test") or splits.get("val")
    if "calib" in splits and test_dir is not None:
        cf, _, _ = _labelled(splits["calib"])
        tf, tl, classes = _labelled(test_dir)
        if not cf or not tf:
            raise DataError(f"no images in {splits['calib'] if not cf else test_dir}")
        calib = _images(cf, p)
        test, labels = _images(tf, p), tl
    else:
        files, labels_all, classes = _labelled(folder)
        if len(files) < 2:
            raise DataError(f"{folder}: {'no images' if not files else 'one image'} "
                            "(need at least two: one to calibrate, one to evaluate)")
        x = _images(files, p)
        calib, test = x[0::2], x[1::2]
        labels = labels_all[1::2]
    y = torch.tensor(labels) if classes else None
    return Data(calib_x=calib, test_x=test, test_y=y, name=f"images:{folder}")


def _arrays(path: Path) -> Data:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if isinstance(loaded, np.ndarray):
        x, y, split = loaded, None, None
    else:
        with loaded as z:
            keys = set(z.files)
            get = lambda *names: next((z[n] for n in names if n in keys), None)  # noqa: E731
            split = (get("calib_x"), get("test_x"), get("test_y"))
            x, y = get("x", "inputs"), get("y", "labels")
        if split[0] is None and x is None:
            raise DataError(f"{path}: no 'x' (or 'inputs', or 'calib_x') array; "
                            f"it holds {', '.join(sorted(keys)) or 'nothing'}")
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    if split is not None and split[0] is not None:
        test = split[1] if split[1] is not None else split[0]
        return Data(calib_x=t(split[0]), test_x=t(test), test_y=t(split[2]),
                    name=f"arrays:{path}")
    if len(x) < 2:
        raise DataError(f"{path}: {len(x)} sample(s); need at least two")
    if y is not None and len(y) != len(x):
        raise DataError(f"{path}: {len(x)} inputs but {len(y)} labels")
    return Data(calib_x=t(x[0::2]), test_x=t(x[1::2]),
                test_y=None if y is None else t(y[1::2]).long(), name=f"arrays:{path}")


def load_data(spec: str, preprocess: Preprocess | None = None):
    """`Data` from a folder, an array file or a factory (see the module docstring)."""
    path = Path(spec)
    if path.is_dir():
        return image_folder(path, preprocess)
    if path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise DataError(f"no such file: {path}")
        return _arrays(path)
    if ":" in spec and not path.exists():

        return as_data(import_factory(spec)(), spec)
    raise DataError(f"--data {spec!r}: not a folder of images, a .npy/.npz file or "
                    "package.module:factory")


def check_fits(data, input_shape: tuple[int, ...], what: str) -> None:
    """One line when the data does not have the model's input shape."""
    for split in ("calib_x", "test_x"):
        x = getattr(data, split)
        if x is not None and tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(f"{data.name or 'data'}: samples of shape {tuple(x.shape[1:])}, "
                            f"but {what} takes {tuple(input_shape)} (batch dimension excluded)")


def check_labels(data, n_outputs: int) -> None:
    if data.test_y is not None and len(data.test_y):
        lo, hi = int(data.test_y.min()), int(data.test_y.max())
        if lo < 0 or hi >= n_outputs:
            raise DataError(f"{data.name or 'data'}: labels {lo}..{hi} outside the model's "
                            f"{n_outputs} outputs")


def import_factory(spec: str) -> Callable:
    """`package.module:factory`, found on sys.path or in the current directory (as
    `python -m` would find it, so `hilq --model mymodels:build` works beside mymodels.py)."""
    import os
    import sys

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ModelError(f"expected package.module:factory, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import {spec!r}: {e}") from None


def as_data(obj, spec: str) -> Data:
    if isinstance(obj, Data):
        return obj
    if isinstance(obj, dict):
        try:
            return Data(**obj)
        except TypeError as e:
            raise ModelError(f"data factory {spec!r} returned a dict with bad keys: {e}") from None
    raise ModelError(f"data factory {spec!r} must return hilq.quant.models.Data or a dict")
