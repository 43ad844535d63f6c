"""Files from other exporters: two inputs (one an image with `-1` batch and dynamic height and
width, one a scalar fixed across samples), weights in `Constant` nodes (which onnx2torch
cannot convert), and two outputs that are not both logits (a dense map and class logits).
The FP32 variant runs as the file is, on both engines; W8A8 goes through the ONNX route;
each output is judged by a figure that fits it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hilq.quant.export import build_artifact
from hilq.quant.models import ModelRef, load_model
from onnx import TensorProto, helper, numpy_helper

from hilq.accuracy import evaluate, output_kind

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "x=1,3,16,16"


def hilq(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hilq", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _const(name: str, array: np.ndarray):
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(array.astype(np.float32), name))


def exported_like_paddle(path: Path, seed: int = 0) -> Path:
    """Conv(3→8, 3×3) → Relu → ×gain → Conv(8→4, 1×1) = map; GAP → Flatten → Gemm(4→5) =
    logits. Weights are Constant nodes, the batch is -1, height and width are named."""
    rng = np.random.default_rng(seed)
    nodes = [
        _const("w1", rng.normal(0, 0.3, (8, 3, 3, 3))), _const("b1", rng.normal(0, 0.1, 8)),
        _const("w2", rng.normal(0, 0.3, (4, 8, 1, 1))), _const("b2", rng.normal(0, 0.1, 4)),
        _const("w3", rng.normal(0, 0.5, (4, 5))), _const("b3", rng.normal(0, 0.1, 5)),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Mul", ["r1", "gain"], ["g1"], name="gain_mul"),
        helper.make_node("Conv", ["g1", "w2", "b2"], ["map"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["map"], ["pool"], name="gap"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])
    gain = helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])
    outs = [helper.make_tensor_value_info("map", TensorProto.FLOAT, [-1, 4, "h", "w"]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, 5])]
    graph = helper.make_graph(nodes, "paddle_like", [x, gain], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)],
                              producer_name="test-exporter")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("route")
    model = exported_like_paddle(d / "paddle_like.onnx")
    rng = np.random.default_rng(1)
    data = d / "feeds.npz"
    np.savez(data, x=rng.standard_normal((24, 3, 16, 16)).astype(np.float32),
             gain=np.array(1.5, np.float32))
    return model, data, d


def test_dynamic_dims_are_read_as_dynamic_and_sized_by_name(files):
    model, _, _ = files
    entry = load_model(ModelRef(str(model), input_shapes=(("x", (1, 3, 16, 16)),)))
    by_name = {i.name: i for i in entry.inputs}
    assert by_name["x"].shape == (1, 3, 16, 16) and by_name["x"].file_dims == (None, 3, None, None)
    assert by_name["gain"].shape == ()


def test_an_unsized_dynamic_dimension_is_one_line_naming_the_input(files):
    model, data, d = files
    r = hilq("bench", "--model", model, "--variants", "fp32", "--no-store", "--data", data)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "input x has dynamic dimensions [?,3,?,?]" in lines[0], lines[0]


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_fp32_runs_the_file_as_it_is_at_the_given_shape(files, runtime, tmp_path):
    model, data, _ = files
    out = tmp_path / "out.json"
    r = hilq("bench", "--model", model, "--input-shape", SHAPE, "--data", data, "--variants",
             "fp32,w8a8", "--runtime", runtime, "--no-store", "--rounds", "1",
             "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {m["variant"]: m for m in json.loads(out.read_text())["measurements"]}
    for variant, m in rows.items():
        assert m["status"] == "ok", (variant, m.get("reason"))
        assert m["timing"]["input_shapes"] == {"x": [1, 3, 16, 16], "gain": []}
        acc = m["accuracy"]
        assert acc["kinds"] == ["map", "logits"]
        assert [o["kind"] for o in acc["outputs"]] == ["map", "logits"]
    fp32, w8 = rows["fp32"]["accuracy"], rows["w8a8"]["accuracy"]
    assert fp32["agreement_fp32"] == 1.0 and fp32["outputs"][0]["sqnr_db"] > 100
    assert w8["outputs"][0]["sqnr_db"] > 25 and w8["outputs"][1]["sqnr_db"] > 20
    assert w8["task"]["map_iou"] > 0.8


def test_the_onnx_route_quantizes_what_pytorch_cannot_take(files):
    model, data, d = files
    ref = ModelRef(str(model), data=str(data), input_shapes=(("x", (1, 3, 16, 16)),))
    fp32 = build_artifact(ref, "fp32", d / "arts")
    assert Path(fp32.path).read_bytes() == model.read_bytes()      # the file, byte for byte
    assert fp32.manifest["settings"]["route"] == "file"
    art = build_artifact(ref, "w8a8", d / "arts")
    s = art.manifest["settings"]
    assert s["route"] == "onnx" and "2 inputs; the PyTorch route takes one" in s["route_reason"]
    assert art.manifest["input_shapes"] == {"x": [1, 3, 16, 16], "gain": []}
    ops = {n.op_type for n in onnx.load(art.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Constant" not in ops
    kinds = {v["layer"]: v["precision"] for v in art.manifest["layer_map"].values()}
    assert kinds == {"conv1": "w8a8", "conv2": "w8a8", "fc": "w8a8"}
    # a per-layer config names the graph's nodes: conv2 left float
    cfg = d / "mix.json"
    cfg.write_text(json.dumps({n: ({"weight": None, "act": None} if n == "conv2" else
                                   art.manifest["bit_config"][n])
                               for n in art.manifest["bit_config"]}))
    mix = build_artifact(ref, f"config:{cfg}", d / "arts")
    assert {v["layer"]: v["precision"] for v in mix.manifest["layer_map"].values()} == {
        "conv1": "w8a8", "conv2": "fp32", "fc": "w8a8"}


def test_no_top1_over_boxes():
    """A detector's raw output (N, 4+C, anchors) is `detections`: SQNR and cosine, never a
    top-1 or an agreement over a box tensor."""
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 320, (6, 4, 2100)), rng.uniform(0, 0.3, (6, 18, 2100))],
                         axis=1).astype(np.float32)
    ref[:, 4, :40] = 0.9                                   # forty confident boxes
    got = ref + rng.normal(0, 0.01, ref.shape).astype(np.float32) * ref.max(axis=2,
                                                                            keepdims=True)
    ev = {"fp32:0": ref, "kind:0": np.array(output_kind(ref))}
    res = evaluate([got], ev)
    assert res["kinds"] == ["detections"]
    assert res["top1"] is None and res["agreement_fp32"] is None and res["kl"] is None
    assert res["outputs"][0]["sqnr_db"] > 30 and 0.5 < res["task"]["detection_map50"] <= 1
    # every box moved by half its size: the task figure sees it, the SQNR barely does
    moved = ref.copy()
    moved[:, :2] += 0.5 * moved[:, 2:4]
    worse = evaluate([moved], ev)
    assert worse["task"]["detection_map50"] < 0.2 and worse["outputs"][0]["sqnr_db"] > 8


def test_output_kinds_from_values():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 10))
    e = np.exp(logits)
    assert output_kind(logits) == "logits"
    assert output_kind(e / e.sum(1, keepdims=True)) == "probs"
    seq = np.exp(rng.standard_normal((4, 40, 100)))
    assert output_kind(seq / seq.sum(2, keepdims=True)) == "sequence"
    assert output_kind(rng.random((4, 1, 32, 32))) == "map"
    assert output_kind(np.zeros((4, 25), np.int64)) == "tokens"


def small_detector(path: Path, seed: int = 0) -> Path:
    """A YOLOv8-shaped head on a two-conv trunk: output (N, 4 + 2 classes, anchors), boxes
    (centre, size) in pixels and class scores, both through a sigmoid; dynamic height and
    width."""
    rng = np.random.default_rng(seed)
    init = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.normal(0, 0.4, (8, 3, 3, 3))), ("b1", rng.normal(0, 0.1, 8)),
        ("w2", rng.normal(0, 0.4, (6, 8, 1, 1))), ("b2", rng.normal(0, 0.1, 6)),
        ("px", np.array([32.0])))]
    init += [numpy_helper.from_array(np.array([0, 6, -1], np.int64), "shape"),
             numpy_helper.from_array(np.array([4, 2], np.int64), "split")]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["head"], name="head"),
        helper.make_node("Sigmoid", ["head"], ["squashed"], name="sigmoid"),
        helper.make_node("Split", ["squashed", "split"], ["box", "scores"], name="split", axis=1),
        helper.make_node("Mul", ["box", "px"], ["pixels"], name="scale"),
        helper.make_node("Concat", ["pixels", "scores"], ["det"], name="concat", axis=1),
        helper.make_node("Reshape", ["det", "shape"], ["output0"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "small_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 6, "anchors"])],
        init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_detector_is_judged_by_map_against_fp32(files, tmp_path):
    """The detector's headline is mAP@0.5 of its W8A8 detections against FP32's (decoded the
    same way); a broken quantization that moves every box shows there, not in a top-1."""
    _, _, d = files
    det = small_detector(d / "det.onnx")
    rng = np.random.default_rng(2)
    np.savez(d / "images.npz", images=rng.uniform(0, 1, (24, 3, 32, 32)).astype(np.float32))
    ref = ModelRef(str(det), data=str(d / "images.npz"), input_shape=(1, 3, 32, 32),
                   route="onnx")
    art = build_artifact(ref, "w8a8", d / "arts")
    assert art.manifest["output_kinds"] == ["detections"]
    sim = art.manifest["simulated"]
    assert sim["top1"] is None and sim["agreement_fp32"] is None
    assert sim["task"]["detection_map50"] > 0.5, sim


def test_search_on_the_onnx_route(files, tmp_path):
    """`hilq search` on a file PyTorch cannot take: layers are the graph's nodes, each
    layer's sensitivity is measured on the graph, and the closed loop measures its pick."""
    model, data, _ = files
    out = tmp_path / "search.json"
    rel = os.path.relpath(model, ROOT)          # a model named by a relative path with folders
    r = hilq("search", "--model", rel, "--input-shape", SHAPE, "--data", data, "--runtime",
             "ort", "--budget", "latency_ms=50%", "--rounds", "1", "--min-duration-s", "0.2",
             "--work-dir", tmp_path / "work", "--json", out)
    assert r.returncode in (0, 4), r.stdout + r.stderr       # 4: budget_missed, said so
    res = json.loads(out.read_text())
    assert set(res["config"]) == {"conv1", "conv2", "fc"}
    assert res["predicted"]["latency_ms"] > 0 and res["measured"]["latency_ms"] > 0
    assert {row["layer"] for row in res["cost_table"]} == {"conv1", "conv2", "fc"}
    assert "searched on its ONNX graph" in r.stderr + r.stdout


def test_a_user_metric_runs_on_the_device_and_reaches_store_and_report(files, tmp_path):
    """`--metric module:fn` travels inside the evaluation set, is computed by the agent
    beside the engine, stored with the measurement, and shown in the report; a metric that
    raises is said in one field, the measurement stands."""
    import sqlite3

    model, data, _ = files
    db = tmp_path / "hilq.sqlite"
    r = hilq("bench", "--model", model, "--input-shape", SHAPE, "--data", data, "--variants",
             "fp32,w8a8", "--runtime", "ort", "--rounds", "1", "--db", db,
             "--metric", "tests.user_metric:logits_close")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = sqlite3.connect(db).execute("select variant, accuracy from measurements").fetchall()
    acc = {v: json.loads(a) for v, a in rows}
    assert acc["fp32"]["metric"] == {"close": 1.0, "same_class": 1.0}
    assert 0 < acc["w8a8"]["metric"]["close"] < 1.0
    rep = hilq("report", "--run", "latest", "--db", db, "--out", tmp_path / "rep")
    assert rep.returncode == 0, rep.stderr
    md = next((tmp_path / "rep").rglob("report.md")).read_text()
    assert f"close {acc['w8a8']['metric']['close']:.3f}" in md
    bad = hilq("bench", "--model", model, "--input-shape", SHAPE, "--data", data, "--variants",
               "fp32", "--runtime", "ort", "--rounds", "1", "--no-store", "--json",
               tmp_path / "bad.json", "--metric", "tests.user_metric:broken")
    assert bad.returncode == 0, bad.stderr
    m = json.loads((tmp_path / "bad.json").read_text())["measurements"][0]
    assert m["status"] == "ok" and "ValueError: no such thing" in m["accuracy"]["metric_error"]
    missing = hilq("bench", "--model", model, "--input-shape", SHAPE, "--variants", "fp32",
                   "--no-store", "--metric", "tests.user_metric:nothing")
    assert missing.returncode == 2 and "has no function 'nothing'" in missing.stderr


def test_the_regression_rule_watches_task_figures_and_user_metrics(tmp_path):
    """A stored figure inside the accuracy (a task figure, a user metric) is compared with its
    history on the same evaluation set, like top-1: a drop past the threshold is flagged."""
    from hilq.bench import regress
    from hilq.bench.store import open_store

    from hilq.measurement import Measurement

    store = open_store(tmp_path / "hilq.sqlite")
    runs = []
    for night, (iou, close) in enumerate([(0.91, 0.80)] * 3 + [(0.908, 0.60)]):
        run = store.begin_run({"night": night})
        acc = {"n": 200, "eval_sha256": "e" * 64, "task": {"map_iou": iou},
               "metric": {"close": close}}
        store.add_measurement(run, Measurement("det", "w8a8", "local", "ort",
                                               latency_ms={"p50": 1.0}, accuracy=acc), round=0)
        store.finish_run(run)
        runs.append(run)
    rows = {r["metric"]: r for r in regress.detect(store, runs[-1])}
    assert rows["metric:close"]["flagged"] and not rows["task:map_iou"]["flagged"]
    assert rows["task:map_iou"]["n_history"] == 3
    store.close()


def test_max_drop_on_a_user_metric(files, tmp_path):
    """`--max-drop NAME=X` limits the search by a figure the model reports (here the user's
    metric): the fastest configuration whose simulated and device figure stay within it."""
    model, data, _ = files
    out = tmp_path / "search.json"
    r = hilq("search", "--model", model, "--input-shape", SHAPE, "--data", data, "--runtime",
             "ort", "--max-drop", "same_class=0.25", "--metric",
             "tests.user_metric:logits_close", "--rounds", "1", "--min-duration-s", "0.2",
             "--work-dir", tmp_path / "work", "--json", out)
    assert r.returncode in (0, 4), r.stdout + r.stderr
    res = json.loads(out.read_text())
    checks = res["accuracy_checks"]
    assert checks and all("same_class" in (c["accuracy"].get("metric") or {}) for c in checks)
    if res["status"] == "ok":
        assert res["measured"]["accuracy_within_limit"]
    nope = hilq("search", "--model", model, "--input-shape", SHAPE, "--data", data,
                "--max-drop", "nothing=0.1", "--rounds", "1", "--min-duration-s", "0.2",
                "--work-dir", tmp_path / "work2")
    assert nope.returncode == 2 and "no figure named 'nothing'" in nope.stderr, nope.stderr


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_debug_on_the_onnx_route(files, runtime, tmp_path):
    """`hilq debug` on a file quantized on its own graph: each layer's error on the engine
    beside the graph's simulation, and each layer's own error, worst first."""
    model, data, _ = files
    out = tmp_path / "debug.json"
    r = hilq("debug", "--model", model, "--input-shape", SHAPE, "--data", data, "--variant",
             "w8a8", "--runtime", runtime, "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    rows = {row["layer"]: row for row in res["layers"]}
    assert set(rows) == {"conv1", "conv2", "fc"}
    for row in rows.values():
        assert row["sqnr_db"] > 20 and row["own_error_db"] > 20, row
        assert abs(row["gap_db"]) < 1.0, row          # the engine computes what was simulated
    assert set(res["culprits"]) == set(rows)


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_a_small_detector_through_bench_and_debug(runtime, tmp_path):
    """The detector made in the test, on both engines: FP32 (the file) and W8A8 (the ONNX
    route) benchmarked and judged by mAP@0.5 on the device, and debugged layer by layer."""
    det = small_detector(tmp_path / "det.onnx")
    np.savez(tmp_path / "images.npz",
             images=np.random.default_rng(2).uniform(0, 1, (24, 3, 32, 32)).astype(np.float32))
    door = ("--model", det, "--input-shape", "images=1,3,32,32", "--data",
            tmp_path / "images.npz", "--route", "onnx", "--runtime", runtime)
    r = hilq("bench", *door, "--variants", "fp32,w8a8", "--rounds", "1", "--no-store",
             "--json", tmp_path / "bench.json")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {m["variant"]: m for m in json.loads((tmp_path / "bench.json").read_text())
            ["measurements"]}
    assert rows["fp32"]["accuracy"]["task"]["detection_map50"] == 1.0
    assert rows["w8a8"]["accuracy"]["task"]["detection_map50"] > 0.5
    assert rows["w8a8"]["accuracy"]["top1"] is None
    r = hilq("debug", *door, "--variant", "w8a8", "--json", tmp_path / "debug.json")
    assert r.returncode == 0, r.stdout + r.stderr
    layers = {row["layer"] for row in json.loads((tmp_path / "debug.json").read_text())["layers"]}
    assert layers == {"stem", "head"}
