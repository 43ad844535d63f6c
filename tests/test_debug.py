"""`hilq debug` (issue 14 item 3): per-layer error, float vs quantized, on the engine (through
the agent, ONNX Runtime) and in simulation. Real artifacts and engines, no mocks."""

from __future__ import annotations

import collections
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hilq.bench import cli, debug_report
from hilq.bench.debug import saturates as engine_saturates
from hilq.quant import debug as qd
from hilq.quant.artifact import Artifact
from hilq.quant.debug_onnx import write_debug_artifact
from onnx import numpy_helper
from torch import nn

KEYS = {"layer", "sqnr_db", "sqnr_db_simulated", "cosine", "own_error_db"}


def _debug(args: list[str], tmp: Path, name: str = "out") -> tuple[int, dict]:
    out = tmp / f"{name}.json"
    rc = cli.main(["debug", *args, "--json", str(out)])
    return rc, json.loads(out.read_text()) if out.is_file() else {}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits-cnn w8a8 debugged on the local device with ONNX Runtime; the artifact kept."""
    tmp = tmp_path_factory.mktemp("debug")
    rc, res = _debug(["--model", "digits-cnn", "--variant", "w8a8", "--out", str(tmp / "art"),
                      "--plot", str(tmp / "layers.png")], tmp)
    assert rc == 0, res
    return tmp, res


def _layers(res):
    return {r["layer"]: r for r in res["layers"]}


# --- the debug copy --------------------------------------------------------------------

def _session(path, opt=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if opt:
        so.optimized_model_filepath = str(opt)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["WeightBiasQuantization"])


def test_debug_copy_runs_the_same_kernels_and_outputs(digits, tmp_path):
    tmp, res = digits
    art = Artifact.load(res["artifact"])
    dbg, taps = write_debug_artifact(art, tmp_path)
    layers = [v["layer"] for v in art.manifest["layer_map"].values()]
    assert sorted(t.layer for t in taps if t.kind == "chain") == sorted(layers)
    # Q outputs exposed, except the last layer's: the logits stay float (the export
    # quantizes no graph output), in its chain tap and its own copy
    last = next(t.layer for t in taps if t.index == 0)      # the graph's own output
    assert all(t.scale is not None and t.dtype == "uint8" for t in taps if t.layer != last)
    assert sorted((t.kind, t.scale) for t in taps if t.layer == last) == [("chain", None),
                                                                          ("own", None)]
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    s0, s1 = _session(art.path, tmp_path / "o0.onnx"), _session(dbg.path, tmp_path / "o1.onnx")
    feeds = {i.name: np.random.default_rng(1).standard_normal(
        [8 if isinstance(d, str) else d for d in i.shape]).astype(np.float32)
        for i in s1.get_inputs()}
    feeds["input"] = x
    got = s1.run(None, feeds)
    assert np.array_equal(s0.run(None, {"input": x})[0], got[0])   # bit-identical logits
    ops = [collections.Counter(n.op_type for n in onnx.load(p).graph.node)
           for p in (tmp_path / "o0.onnx", tmp_path / "o1.onnx")]
    # every unit, the originals and their `own` copies, still fuses into integer kernels
    assert ops[1]["QLinearConv"] == 2 * ops[0]["QLinearConv"] == 10
    assert ops[1]["QGemm"] == 2 * ops[0]["QGemm"] and ops[1]["Conv"] == ops[1]["Gemm"] == 0


# --- the simulation side ---------------------------------------------------------------

def test_inherited_noise_adds_in_power():
    assert qd.inherited_db(20.0, 30.0) == pytest.approx(-10 * math.log10(0.01 - 0.001))
    assert qd.inherited_db(30.0, 30.0) is None and qd.inherited_db(None, 30.0) is None


def test_capture_survives_inplace_relu_and_own_error_uses_float_inputs():
    from hilq.quant.pipeline import variant_bit_config
    from hilq.quant.transform import calibrate, prepare

    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(16, 2, 6, 6)
    q = calibrate(prepare(f, variant_bit_config(f, "w4a4"), fold=False), [x])
    cap = qd.capture(f, q, x)
    with torch.no_grad():
        y0 = f[0](x)
        own1 = q[2](torch.relu(y0))
    assert (cap.float_out["0"] < 0).any()                    # copied before ReLU overwrote it
    assert np.allclose(cap.float_out["0"], y0.numpy())
    assert np.allclose(cap.own["2"], own1.numpy())            # fed the float model's input
    rows = {r["layer"]: r for r in qd.simulated(cap)}
    assert rows["0"]["own_error_db_simulated"] == pytest.approx(rows["0"]["sqnr_db_simulated"])
    assert rows["2"]["sqnr_db_simulated"] < rows["2"]["own_error_db_simulated"]  # it inherits


# --- engine vs simulation on an unmodified artifact -----------------------------------

def test_json_shape_and_worst_first(digits):
    _, res = digits
    assert {"model", "variant", "runtime", "device", "layers"} <= set(res)
    assert (res["model"], res["variant"], res["runtime"], res["device"]) == \
        ("digits-cnn", "w8a8", "ort", "local")
    assert res["status"] == "ok" and res["kernels"]["float"] == []
    assert [r["layer"] for r in res["layers"]] and all(KEYS <= set(r) for r in res["layers"])
    sq = [r["sqnr_db"] for r in res["layers"]]
    assert sq == sorted(sq) and len(sq) == 6
    assert all(0.99 < r["cosine"] <= 1 for r in res["layers"])


def test_engine_agrees_with_simulation_or_says_why(digits):
    """Every layer's engine SQNR within 1 dB of the fake-quant model's, or explained: the
    layers downstream of the residual Add differ by ~1.1 dB because the export quantizes
    conv outputs the fake-quant model keeps float; simulating those Q nodes closes it (to
    0.11 dB at the fc, behind ORT's integer average pool, which rounds twice)."""
    _, res = digits
    rows = _layers(res)
    for name in ("stem.0", "block.conv1", "block.conv2"):    # before the Add: no extra Q
        assert abs(rows[name]["gap_db"]) < 0.1, rows[name]
    saturates = engine_saturates("ort", res["cpu_flags"])
    for r in res["layers"]:
        if saturates and r["op"] == "Gemm" and r["own_error_db"] < r["own_error_db_simulated"] - 1:
            # AVX2 without VNNI (e.g. Zen 3): ORT's u8×s8 Gemm sums product pairs in int16
            # with saturation; the layer's own error is worse on the engine, and it is named
            assert any(n.startswith(f"{r['layer']}:") and "VPMADDUBSW" in n
                       for n in res["notes"]), res["notes"]
            continue
        assert abs(r["sqnr_db"] - r["sqnr_db_deployed_sim"]) < 0.25, r
        assert abs(r["own_error_db"] - r["own_error_db_simulated"]) < 0.1, r
        if abs(r["gap_db"]) > 1.0:
            assert any(r["layer"] in n and "residual Add" in n for n in res["notes"]), r


def test_report_sections_and_plot(digits):
    tmp, res = digits
    assert (tmp / "layers.png").read_bytes()[:4] == b"\x89PNG"
    md = debug_report.section(res)
    assert md.count("\n| ") == 1 + len(res["layers"]) and res["layers"][0]["layer"] in md
    page = debug_report.html_section(res)
    assert page.count("<tr>") == 1 + len(res["layers"]) and "data:image/png;base64," in page


# --- a corrupted artifact --------------------------------------------------------------

def _corrupt(art: Artifact, out: Path, init: str, factor: float) -> Path:
    """A copy of `art` with one initializer scaled (its manifest re-hashed to match)."""
    out.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(art.path)
    t = next(i for i in proto.graph.initializer if i.name == init)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), init))
    path = out / Path(art.path).name
    onnx.save(proto, str(path))
    ref = Path(art.path).parent / art.manifest["reference"]
    shutil.copyfile(ref, out / ref.name)
    Artifact.create(path, **{k: v for k, v in art.manifest.items()
                             if k not in ("file", "sha256", "size_bytes")})
    return path


@pytest.mark.parametrize("layer,factor", [("down.0", 8.0), ("block.conv1", 8.0)])
def test_corrupted_weight_scale_is_ranked_first_on_the_engine(digits, tmp_path, layer, factor):
    _, clean = digits
    path = _corrupt(Artifact.load(clean["artifact"]), tmp_path / "bad",
                    f"{layer}.weight_scale", factor)
    rc, res = _debug(["--artifact", str(path)], tmp_path)
    assert rc == 0
    # worst SQNR on the engine: the layer, or the conv fed by it, which inherits all of its
    # error and adds its own (on the Zen 5 the two read −14.02 and −14.35 dB: a tie that the
    # CPU's kernels order); which one introduced it is the culprit ranking's job, below
    worst = [r["layer"] for r in res["layers"][:2]]
    assert layer in worst, worst
    assert res["culprits"][0] == layer                  # where the error is introduced
    bad, before = _layers(res)[layer], _layers(clean)[layer]
    assert bad["own_error_db"] < 0 < before["own_error_db"] - 25
    # the simulation is the uncorrupted fake-quant model: it does not see it
    assert bad["sqnr_db_simulated"] == pytest.approx(before["sqnr_db_simulated"], abs=1e-6)


def test_inherited_error_is_told_apart_from_own(digits, tmp_path):
    """Shrinking conv.0's weight scale wrecks conv.0 and the fc after it; the fc shows the
    lowest SQNR, but its own error is intact: the culprit ranking names conv.0."""
    _, clean = digits
    path = _corrupt(Artifact.load(clean["artifact"]), tmp_path / "bad", "conv.0.weight_scale",
                    0.125)
    rc, res = _debug(["--artifact", str(path)], tmp_path)
    rows = _layers(res)
    assert rc == 0 and res["culprits"][0] == "conv.0"
    intact = 30 if engine_saturates("ort", res["cpu_flags"]) else 35   # saturation costs ~7 dB
    assert rows["fc"]["sqnr_db"] < 10 and rows["fc"]["own_error_db"] > intact
    assert rows["fc"]["inherited_db"] < 10


# --- the command line ------------------------------------------------------------------

def test_simulation_only(digits, tmp_path):
    _, clean = digits
    rc, res = _debug(["--artifact", clean["artifact"], "--no-engine"], tmp_path)
    assert rc == 0 and res["runtime"] is None and res["status"] == "simulated"
    assert all(r["sqnr_db"] is None and r["own_error_db"] is None for r in res["layers"])
    sim = [r["sqnr_db_simulated"] for r in res["layers"]]
    assert sim == sorted(sim)
    assert sim == pytest.approx(sorted(r["sqnr_db_simulated"] for r in clean["layers"]))


@pytest.mark.parametrize("argv,msg", [
    ([], "give --model M --variant V, or --artifact FILE"),
    (["--variant", "w8a8"], "--variant needs --model"),
    (["--model", "digits-cnn", "--variant", "w8a8", "--samples", "0"], "--samples"),
    (["--artifact", "/nonexistent.onnx"], "file not found"),
])
def test_bad_input_is_one_line(argv, msg, capsys):
    assert cli.main(["debug", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and err.startswith("hilq debug: error:")


def test_fp32_artifact_has_nothing_to_debug(tmp_path, capsys):
    from hilq.quant.export import build_artifact

    art = build_artifact("digits-cnn", "fp32", tmp_path)
    assert cli.main(["debug", "--artifact", art.path]) == 2
    assert "nothing quantized to debug" in capsys.readouterr().err


def test_a_float_last_layer_is_debugged_too(tmp_path):
    """A searched configuration often keeps the classifier float: its output is then the
    graph's own output, whose shape shape inference reports outside `value_info`. The debug
    copy must still declare it (the checker refused the copy, and the nightly's debug of the
    searched configuration read "not run: ValidationError")."""
    from hilq.quant.models import load_model
    from hilq.quant.pipeline import variant_bit_config
    from hilq.quant.spec import BitConfig
    from hilq.quant.transform import fold_bn

    net = fold_bn(load_model("digits-cnn").build().eval())
    cfg = variant_bit_config(net, "w8a8")
    path = tmp_path / "fc-float.json"
    path.write_text(BitConfig({k: v for k, v in cfg.layers.items() if k != "fc"}).to_json())
    rc, res = _debug(["--model", "digits-cnn", "--variant", f"config:{path}",
                      "--out", str(tmp_path / "art")], tmp_path)
    assert rc == 0, res
    rows = _layers(res)
    assert "fc" in rows and rows["fc"]["sqnr_db"] > rows["conv.0"]["sqnr_db"] - 1.0, rows["fc"]
