"""Shared test pieces: a quick measurement protocol, nightly configs written as TOML, digits-cnn
exported w8a8, ORT's own static quantizer run on a float model (the reference that hilq's
export is held to), and `require`: the one way a test skips for want of something installed."""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import pytest

from hilq.measurement import Protocol

# What a test may skip for want of (HILQ_REQUIRE names those whose absence fails instead):
# a PostgreSQL server and psycopg, an OpenSSH sshd, network namespaces (root and `ip netns`),
# Ray, MLPerf LoadGen (mlcommons-loadgen), a Chromium to take screenshots.
CAPABILITIES = ("pg", "ssh", "netns", "ray", "loadgen", "chromium")


def required() -> set[str]:
    """The capabilities env HILQ_REQUIRE names (a comma list): where one is missing, the
    tests that need it fail instead of skipping. `.ci/run` names all: CI installs them."""
    names = {n.strip() for n in os.environ.get("HILQ_REQUIRE", "").split(",") if n.strip()}
    if unknown := names - set(CAPABILITIES):
        raise ValueError(f"HILQ_REQUIRE: unknown {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(CAPABILITIES)})")
    return names


def needs(name: str, reason: str) -> str:
    """The skip reason of a test that needs capability `name`: `needs NAME: reason` (a
    `skipif` marker may use it; conftest turns such a skip into a failure when required)."""
    if name not in CAPABILITIES:
        raise ValueError(f"unknown capability {name!r} (known: {', '.join(CAPABILITIES)})")
    return f"needs {name}: {reason}"


def require(name: str, reason: str) -> NoReturn:
    """Skip this test for want of capability `name`, or fail it when HILQ_REQUIRE names `name`
    (an installed-by-CI dependency that is missing is a broken build, not a reason to skip)."""
    __tracebackhide__ = True            # the skip is reported at its caller's line
    if name in required():
        pytest.fail(f"HILQ_REQUIRE names {name!r}, but {reason}", pytrace=False)
    pytest.skip(needs(name, reason))


def require_import(name: str, module: str, reason: str):
    """`module` imported, or `require(name, …)` when it cannot be."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(module)
    except ImportError as e:
        why = f"{reason} ({e})"
    require(name, why)


# A protocol short enough for a test: each test overrides what it needs otherwise.
QUICK_PROTOCOL = {"warmup_iters": 3, "warmup_s": 0.0, "min_iters": 10, "min_duration_s": 0.05,
                  "idle_s": 0.05}

# digits-cnn, the smallest model, in the two variants every nightly test measures
DIGITS_BENCH = {"model": "digits-cnn", "variants": ["fp32", "w8a8"]}
# a search on it, under a latency budget of 50%, calibrated on real data
DIGITS_SEARCH = {"model": "digits-cnn", "budgets": {"latency_ms": "50%"}, "calib_data": "real"}


def quick_protocol(**overrides) -> Protocol:
    """QUICK_PROTOCOL as a Protocol, with `overrides` in place of its values."""
    return Protocol(**{**QUICK_PROTOCOL, **overrides})


def _toml_value(v) -> str:
    if isinstance(v, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, (str, bool, int, float)):
        return json.dumps(v)        # a JSON string, number or boolean is TOML too
    raise TypeError(f"no TOML for {v!r}")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_table(values: dict) -> str:
    """`key = value` lines; a None value leaves its key out (the config's default)."""
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in values.items()
                   if v is not None)


def write_nightly_config(path: Path, *, protocol: dict | None = None,
                         bench: Iterable[dict] = (DIGITS_BENCH,), search: Iterable[dict] = (),
                         **top) -> Path:
    """A nightly config (bench/config.py) at `path`: the `top` keys, then `[protocol]`
    (QUICK_PROTOCOL when None), one `[[bench]]` per entry and one `[[search]]` per entry.
    Paths are written as strings, dicts as inline tables."""
    text = _toml_table(top)
    text += "[protocol]\n" + _toml_table(QUICK_PROTOCOL if protocol is None else protocol)
    text += "".join("[[bench]]\n" + _toml_table(b) for b in bench)
    text += "".join("[[search]]\n" + _toml_table(s) for s in search)
    path.write_text(text)
    return path


def export_digits_w8a8(folder: Path) -> tuple:
    """digits-cnn, BN folded, quantized w8a8 (seed 0) and exported to `folder`/digits-w8a8.onnx
    with its calibration data: (quantized model, data, path, export_onnx's info)."""
    from hilq.quant.export import export_onnx
    from hilq.quant.models import load_model
    from hilq.quant.pipeline import quantize_model, variant_bit_config
    from hilq.quant.transform import fold_bn

    entry = load_model("digits-cnn")
    net, data = entry.build().eval(), entry.data()
    res = quantize_model(entry, variant_bit_config(fold_bn(net), "w8a8"), seed=0, model=net)
    path = folder / "digits-w8a8.onnx"
    info = export_onnx(res.qmodel, entry.input_shape, path, calib_x=data.calib_x)
    return res.qmodel, data, path, info


def ort_quantize_static(fp32: Path, out: Path, calib_x) -> Path:
    """ORT's own quantize_static of the FP32 model at `fp32` into `out`: QDQ, U8 activations,
    S8 per-channel weights, calibrated on the first 256 rows of `calib_x` in batches of 64."""
    from onnxruntime import quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_x[i:i + 64].numpy()} for i in range(0, 256, 64)])

        def get_next(self):
            return next(self.it, None)

    ortq.quantize_static(str(fp32), str(out), Reader(), quant_format=ortq.QuantFormat.QDQ,
                         activation_type=ortq.QuantType.QUInt8,
                         weight_type=ortq.QuantType.QInt8, per_channel=True)
    return out


def agent_pids(workdir: Path, timing: bool = False) -> list[int]:
    """Processes running in a session folder under `workdir` (an agent, its meter); with
    `timing`, only an agent measuring (given a protocol), not a short `--facts` run."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cwd.startswith(str(workdir)) and (not timing or b"--protocol" in cmd):
            out.append(int(pid))
    return out
