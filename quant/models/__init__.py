"""Models hilq knows by name, and the one door for any user model.

`load_model(ref)` returns a `ModelEntry`: a way to build the `nn.Module` and its data. A
model is a built-in name (`BUILTIN`, listed explicitly: nothing is registered behind the
reader's back), `package.module:factory` (a function returning an `nn.Module`), or a path to
an FP32 `.onnx` file (`onnx_file`). Its data (`ModelRef.data`, the `--data` door of
`quant.data`) is a folder of images, `.npy`/`.npz` arrays or `package.module:factory`. A
user model needs no data at all for FP32 and data-free variants: its input shape comes from
the ONNX file or from `--input-shape`, and `entry.data()` then holds seeded Gaussian inputs
for reference outputs only (`Data.calib_x` None, `data_free` True).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Data, import_factory
from ..spec import ModelError

__all__ = ["BUILTIN", "Data", "ModelEntry", "ModelError", "ModelRef", "load_model"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], Data]
    input_shape: tuple[int, ...]      # one sample, without the batch dimension
    description: str = ""
    onnx_path: str | None = None      # a user's FP32 file: its fp32 variant is the file itself
    data_free: bool = False           # no data given: FP32 and distilled/noise calibration only
    preprocess: dict | None = None    # how images became inputs (recorded in manifests)
    # the same model at another sequence length (`ModelRef.seq_len`); None: the input has no
    # sequence axis, so a sequence-length sweep is refused rather than guessed
    at_seq_len: Callable[[int], ModelEntry] | None = None
    # an ONNX file's inputs at their static shapes (`onnx_file.InputSpec`), all of them:
    # the file is benchmarked and quantized on the graph from these, without PyTorch
    inputs: tuple = ()
    # what the outputs are (`hilq.accuracy.KINDS`) where the model knows better than the
    # values can tell: tiny-transformer's (batch, seq, vocab) logits look like any tensor
    output_kinds: tuple = ()


@dataclass(frozen=True)
class ModelRef:
    """What the commands and nightly configs name: the model and, for a user's model, its
    data, input shape and image preprocessing. `name` is what the store and reports show."""

    name: str
    data: str | None = None
    input_shape: tuple[int, ...] | None = None   # with the batch dimension, as --input-shape
    preprocess: str | dict | None = None
    seq_len: int | None = None      # a sequence model at this length (None: its own)
    # an ONNX file's inputs by name, each with its batch: ((name, shape), ...)
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    # how an ONNX file's integer variants are built: auto (PyTorch where onnx2torch converts
    # the file, else the ONNX graph), torch, or onnx (quant.options.ROUTES)
    route: str = "auto"
    # a user's metric, `module:function` (NNCF's validation_fn): fn(outputs, fp32_outputs,
    # labels) -> {name: value}, higher is better, computed on the device
    metric: str | None = None

    def key(self) -> dict:
        """What decides an artifact's content besides the weights (its cache key)."""
        d = {"data": self.data, "input_shape": list(self.input_shape or ()) or None,
             "preprocess": self.preprocess, "seq_len": self.seq_len,
             "input_shapes": {n: list(s) for n, s in self.input_shapes or ()} or None,
             "route": None if self.route == "auto" else self.route, "metric": self.metric}
        return {k: v for k, v in d.items() if v is not None}


def name_of(model: str | ModelRef) -> str:
    return model.name if isinstance(model, ModelRef) else model


def parse_shape(text: str | list | tuple | None) -> tuple[int, ...] | None:
    """`"1,3,224,224"` -> (1, 3, 224, 224); one line for anything else."""
    if text is None or isinstance(text, tuple):
        return text
    try:
        dims = tuple(int(s) for s in (text if isinstance(text, list) else text.split(",")))
    except ValueError:
        raise ModelError(f"--input-shape {text!r}: expected integers like 1,3,224,224") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ModelError(f"--input-shape {text!r}: expected positive sizes with the batch "
                         "first, like 1,3,224,224")
    return dims


def parse_shapes(items) -> tuple[tuple[int, ...] | None, tuple | None]:
    """`--input-shape` as given, once or repeated: `1,3,224,224` (the model's one input) and
    `NAME=1,3,224,224` (an ONNX file's input by name), or a config's table of name -> list.
    Returns (the unnamed shape, ((name, shape), ...)); one line for anything else."""
    if items is None:
        return None, None
    if isinstance(items, dict):
        items = [f"{k}={','.join(map(str, v)) if isinstance(v, list | tuple) else v}"
                 for k, v in items.items()]
    elif isinstance(items, str | tuple) or (isinstance(items, list) and items
                                            and not isinstance(items[0], str)):
        items = [items]
    unnamed, named = None, {}
    for item in items:
        if isinstance(item, str) and "=" in item:
            name, _, dims = item.partition("=")
            try:
                shape = tuple(int(s) for s in dims.split(",")) if dims.strip() else ()
            except ValueError:
                raise ModelError(f"--input-shape {item!r}: expected NAME=1,3,224,224") from None
            if any(d < 1 for d in shape):
                raise ModelError(f"--input-shape {item!r}: sizes must be positive")
            named[name.strip()] = shape
        else:
            unnamed = parse_shape(item)
    return unnamed, tuple(named.items()) or None


def _builtin() -> dict[str, Callable[[], ModelEntry]]:
    from . import convnets, digits, transformer

    return {
        "digits-cnn": digits.entry,
        "resnet18": convnets.resnet18_entry,
        "resnet50": convnets.resnet50_entry,
        "mobilenet_v2": convnets.mobilenet_v2_entry,
        "tiny-transformer": transformer.entry,
    }


BUILTIN = ("digits-cnn", "resnet18", "resnet50", "mobilenet_v2", "tiny-transformer")


def _module_factory(factory: Callable, spec: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = factory()
        if not isinstance(m, nn.Module):
            raise ModelError(f"model factory {spec!r} returned {type(m).__name__}, "
                             "not a torch.nn.Module")
        return m
    return build


def _no_data(name: str, shape: tuple[int, ...], dtype: str = "float32") -> Callable[[], Data]:
    """Seeded Gaussian inputs for reference outputs; nothing to calibrate on or score."""
    def data() -> Data:
        g = torch.Generator().manual_seed(0)
        x = torch.randn((8, *shape), generator=g).to(getattr(torch, dtype))
        return Data(calib_x=None, test_x=x, name="none")
    return data


def _at_seq_len(entry: ModelEntry, seq_len: int) -> ModelEntry:
    """`entry` rebuilt at `seq_len`, or one line saying its input has no sequence axis."""
    if entry.at_seq_len is None:
        shape = "x".join(map(str, entry.input_shape))
        raise ModelError(f"--seq-len: {entry.name} has no sequence axis (input {shape}); "
                         "only sequence models such as tiny-transformer take it")
    return entry.at_seq_len(seq_len)


def load_model(ref: str | ModelRef, data: str | None = None, *,
               input_shape: tuple[int, ...] | None = None, preprocess=None) -> ModelEntry:
    """The `ModelEntry` a model door names (see the module docstring); `data` etc. may come
    in the `ModelRef` or as arguments (the argument wins)."""
    from dataclasses import replace

    from ..data import parse_preprocess

    ref = ref if isinstance(ref, ModelRef) else ModelRef(ref)
    ref = replace(ref, **{k: v for k, v in (("data", data), ("input_shape", input_shape),
                                            ("preprocess", preprocess)) if v is not None})
    if ref.metric:
        from ..evalset import metric_arrays

        metric_arrays(ref.metric)       # a metric that cannot run is one line, before any work
    shape_given, pre = parse_shape(ref.input_shape), parse_preprocess(ref.preprocess)
    builtin = _builtin()
    if ref.name in builtin:
        entry = _builtin_entry(builtin[ref.name](), ref, shape_given)
        if ref.data is None:
            return entry
        src = _Source(entry.build, entry.input_shape, entry.description)
    else:
        src = _user_source(ref, shape_given, pre)
        if ref.seq_len is not None:
            raise ModelError(f"--seq-len: {ref.name} declares no sequence axis (a user model "
                             "is sized by --input-shape or its data; built-in tiny-transformer "
                             "takes --seq-len)")
    return _entry(ref, src, pre)


@dataclass(frozen=True)
class _Source:
    """A model door resolved: how to build the module, one sample's shape, what it is."""

    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    description: str
    onnx_path: str | None = None
    dtype: str = "float32"
    inputs: tuple = ()                # an ONNX file's inputs (`onnx_file.InputSpec`)
    data: Data | None = None          # the user's data, when reading it sized the input


def _builtin_entry(entry: ModelEntry, ref: ModelRef, shape_given) -> ModelEntry:
    if ref.seq_len is not None:
        entry = _at_seq_len(entry, ref.seq_len)
    if shape_given is not None and tuple(shape_given[1:]) != entry.input_shape:
        raise ModelError(f"--input-shape: built-in {ref.name} takes "
                         f"{','.join(map(str, (1, *entry.input_shape)))}")
    return entry


def _user_source(ref: ModelRef, shape_given, pre) -> _Source:
    """An ONNX file or a `package.module:factory`, or one line saying what is missing."""
    from pathlib import Path

    name = ref.name
    if name.endswith(".onnx") or Path(name).suffix == ".onnx":
        from . import onnx_file

        path = Path(name)
        proto = onnx_file.read(path)
        given = {**({"": shape_given} if shape_given is not None else {}),
                 **dict(ref.input_shapes or ())}
        inputs = onnx_file.inputs_of(proto, path, given)
        return _Source(lambda: onnx_file.build(proto, path), inputs[0].shape[1:],
                       f"ONNX file {path}", str(path.resolve()), inputs[0].dtype, inputs)
    if ref.input_shapes:
        raise ModelError(f"--input-shape NAME=...: only an ONNX file's inputs are named; "
                         f"{name} takes --input-shape 1,3,224,224")
    if ":" not in name:
        raise ModelError(f"unknown model {name!r} (built-in: {', '.join(BUILTIN)}; "
                         "or package.module:factory, or a path to an .onnx file)")
    build = _module_factory(import_factory(name), name)
    if shape_given is not None:
        return _Source(build, tuple(shape_given[1:]), f"user model {name}")
    if ref.data is None:
        raise ModelError(f"user model {name!r} needs --data (images, .npy/.npz or "
                         "package.module:factory) or --input-shape (e.g. 1,3,224,224)")
    from ..data import load_data

    data = load_data(ref.data, pre)
    return _Source(build, tuple(data.calib_x.shape[1:]), f"user model {name}", data=data)


def _entry(ref: ModelRef, src: _Source, pre) -> ModelEntry:
    """The entry of a resolved source: data-free, or its data loaded once, when asked,
    and checked against the input shape."""
    preprocess = pre.to_dict() if pre else None
    if ref.data is None:
        # A declared preprocessing still says what inputs look like (distillation's prior).
        return ModelEntry(ref.name, src.build, _no_data(ref.name, src.shape, src.dtype),
                          src.shape, src.description, src.onnx_path, data_free=True,
                          preprocess=preprocess, inputs=src.inputs)
    loaded = [src.data] if src.data is not None else []

    def checked() -> Data:
        from ..data import check_fits, load_data
        from ..onnx_feeds import named_data

        if not loaded:
            by_name = named_data(ref.data, src.inputs) if src.inputs else None
            loaded.append(by_name if by_name is not None else load_data(ref.data, pre))
        check_fits(loaded[0], src.shape, ref.name)
        return loaded[0]

    return ModelEntry(ref.name, src.build, checked, src.shape, src.description, src.onnx_path,
                      preprocess=preprocess, inputs=src.inputs)
