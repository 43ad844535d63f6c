"""Logs that stay readable: a line hilq prints is one line in a file (rich breaks at column 80
when stdout is not a terminal), and ONNX Runtime sessions hilq opens for its own work log at
error level (a MobileNet export otherwise floods the log with "Removing initializer"
warnings, one per unused weight)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from hilq.bench.cli import console
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def test_a_console_on_a_file_never_wraps_a_line():
    from rich.table import Table

    buf = io.StringIO()
    out = console(file=buf, highlight=False)
    msg = "digits-cnn: iteration 1: predicted 0.123 ms, within the all-INT8 baseline " * 4
    out.print(f"[dim]{msg}[/dim]")
    t = Table(title="a wide table")
    for k in range(8):
        t.add_column(f"column number {k}")
    t.add_row(*[f"value-{k}-" + "x" * 12 for k in range(8)])
    out.print(t)
    lines = buf.getvalue().splitlines()
    assert lines[0].rstrip() == msg.rstrip()     # the whole message, on one line
    assert all("…" not in ln for ln in lines)    # no cell was cut to fit 80 columns
    assert max(len(ln) for ln in lines[1:]) > 160


def test_a_piped_command_keeps_long_names_on_one_line(tmp_path):
    """`hilq allocate ... > log`: a 120-character layer name is one piece of one line."""
    name = "backbone." + ".".join(f"stage{k}" for k in range(18))
    table = tmp_path / "costs.csv"
    table.write_text("layer,precision,sensitivity,latency_ms\n"
                     f"{name},w8a8,0.5,1.0\n{name},fp32,0.0,2.0\n")
    r = subprocess.run([sys.executable, "-m", "hilq", "allocate", "--table", str(table),
                        "--budget", "latency_ms=3"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": ""}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(name) > 100 and any(name in ln for ln in r.stdout.splitlines()), r.stdout


def _unused_initializer_model(path: Path) -> Path:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(np.ones(3, np.float32), "unused_weight")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_host_side_onnx_runtime_sessions_log_at_error_level(tmp_path, capfd):
    """The calibration pass and the export's deviation check (quant.onnx_export, quant.assembly) and the engine's
    profiling session (devices.runtimes.ort) open a graph with an unused initializer: ORT's
    default level would print a warning for it on fd 2 each time."""
    from hilq.devices.runtimes import ort as ort_runtime
    from hilq.quant import assembly, onnx_export

    path = _unused_initializer_model(tmp_path / "m.onnx")
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.savez(tmp_path / "ref.npz", **{"input:x": x, "output:0": np.maximum(x, 0)})
    ranges = onnx_export.calibrate(onnx.load(path), ["y"], torch.from_numpy(x))
    assert ranges["y"] == (0.0, 1.0)
    assert assembly.ort_deviation(path, tmp_path / "ref.npz") == 0.0
    ort_runtime._profiled_ops(str(path), ["CPUExecutionProvider"], [("x", [2, 3], np.float32)])
    err = capfd.readouterr().err
    assert "Removing initializer" not in err, err


def test_the_warning_is_what_onnx_runtime_prints_by_default(tmp_path, capfd):
    """The check above can fail: the same graph at ORT's default level does warn."""
    import onnxruntime as ort

    ort.InferenceSession(str(_unused_initializer_model(tmp_path / "m.onnx")),
                         providers=["CPUExecutionProvider"])
    assert "Removing initializer 'unused_weight'" in capfd.readouterr().err
