"""Accuracy measured on the device (issue 14): the agent's evaluation over a content-addressed
evaluation set, stored beside the latency, compared with the fake-quant figure, and watched
by the regression rule. Real ONNX Runtime and OpenVINO through the agent; no mocks."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3

import numpy as np
import onnx
import pytest
from helpers import quick_protocol
from hilq.bench import cli, regress
from hilq.bench.runner import bench_variants
from hilq.bench.store import open_store
from hilq.devices.local import LocalDevice
from hilq.quant import evalset
from hilq.quant.artifact import Artifact
from hilq.quant.export import build_artifact
from onnx import numpy_helper

from hilq.accuracy import evaluate
from hilq.measurement import Measurement

QUICK = quick_protocol(warmup_iters=2)


# --- the figures -----------------------------------------------------------------------

def test_figures_by_hand():
    ref = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    got = ref.copy()
    got[2] = [2.0, 0.0, 1.0]           # sample 2: argmax moves to class 0
    ev = {"fp32:0": ref, "labels": np.array([0, 1, 2, 1])}
    r = evaluate([got], ev)
    assert r["n"] == 4
    assert r["top1"] == pytest.approx(2 / 4)          # samples 0, 1 right; 2 moved; 3 wrong
    assert r["agreement_fp32"] == pytest.approx(3 / 4)
    assert r["sqnr_db"] == pytest.approx(10 * math.log10(15.0 / 4.0))
    assert r["worst"][0] == 2                          # the only sample with KL > 0
    p = np.exp(ref[2]) / np.exp(ref[2]).sum()
    q = np.exp(got[2]) / np.exp(got[2]).sum()
    assert r["kl"] == pytest.approx(float((p * np.log(p / q)).sum()) / 4, rel=1e-6)
    assert evaluate([ref], ev)["sqnr_db"] == 200.0


def test_integer_outputs_are_dequantized():
    ref = np.linspace(-1, 1, 12).reshape(3, 4)
    q = np.round(ref / 0.01).astype(np.int8)
    r = evaluate([q], {"fp32:0": ref, "scale:0": np.float32(0.01), "zero_point:0": np.int8(0)})
    assert r["outputs"][0]["sqnr_db"] > 40 and r["outputs"][0]["cosine"] > 0.9999
    raw = evaluate([q], {"fp32:0": ref})   # without the scale the same bytes read as garbage
    assert raw["outputs"][0]["sqnr_db"] < 0


# --- the evaluation set ----------------------------------------------------------------

def test_evalset_is_content_addressed(tmp_path):
    a = {"input:x": np.arange(6, dtype=np.float32).reshape(2, 3), "labels": np.array([0, 1])}
    one = evalset.write(tmp_path / "a", a, "m", "d")
    two = evalset.write(tmp_path / "b", dict(a), "m", "d")
    assert one.sha256 == two.sha256 and one.manifest["n"] == 2 and one.manifest["labels"]
    with np.load(one.path) as z:
        assert np.array_equal(z["input:x"], a["input:x"])
    b = {**a, "labels": np.array([1, 1])}
    assert evalset.write(tmp_path / "c", b, "m", "d").sha256 != one.sha256


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return {v: build_artifact("digits-cnn", v, out)
            for v in ("fp32", "w8a8", "w4a8", "w4a4")}, out


RUNS = {"ort": ("fp32", "w8a8", "w4a8", "w4a4"), "openvino": ("fp32", "w8a8")}


def test_export_records_eval_set_and_simulated_figures(digits):
    arts, out = digits
    shas = {a.manifest["eval_set"]["sha256"] for a in arts.values()}
    assert len(shas) == 1                         # one set shared by every variant
    ev = evalset.load(arts["w8a8"])
    assert ev is not None and ev.sha256 in shas and ev.manifest["labels"]
    sim = arts["fp32"].manifest["simulated"]
    assert sim["agreement_fp32"] == 1.0 and sim["top1"] > 0.95
    assert arts["w4a4"].manifest["simulated"]["sqnr_db"] < arts["w8a8"].manifest["simulated"]["sqnr_db"]


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_device_accuracy_beside_the_simulation(digits, tmp_path, runtime):
    arts, _ = digits
    store = open_store(tmp_path / "s.sqlite")
    run_id = store.begin_run({"t": 1})
    dev = LocalDevice(workdir=str(tmp_path / "w"))
    ms = bench_variants("digits-cnn", [arts[v] for v in RUNS[runtime]], dev, runtime, QUICK,
                        rounds=2,
                        store=store, run_id=run_id)
    for m in ms:
        a = m.accuracy
        assert m.ok, m.reason
        assert a["n"] == arts[m.variant].manifest["eval_set"]["n"]
        assert a["eval_sha256"] == arts[m.variant].manifest["eval_set"]["sha256"]
        assert a["simulated_top1"] == arts[m.variant].manifest["simulated"]["top1"]
        assert a["gap_top1"] == pytest.approx(a["top1"] - a["simulated_top1"])
        if m.variant == "w8a8":
            assert abs(a["gap_top1"]) <= 0.005, a
    rows = [r for r in store.measurements(run_id) if r["variant"] == "w8a8"]
    assert len(rows) == 2
    measured = [r for r in rows if r["eval_sha256"]]
    assert len(measured) == 1                     # once per variant, not every round
    assert measured[0]["top1"] == measured[0]["accuracy"]["top1"]


def test_torch_programs_are_judged_on_the_device_too(digits, tmp_path):
    """`.pt2` artifacts carry an evaluation set too (the same test inputs and FP32 logits as
    the ONNX one, keyed by the program's own input name), and the torch runtime's figures
    sit beside the saved program's eager run on the host."""
    from hilq.quant import export_torch

    onnx_ev = evalset.load(digits[0]["fp32"])
    arts = [export_torch.build("digits-cnn", v, tmp_path / "a") for v in ("fp32", "w8a8")]
    store = open_store(tmp_path / "s.sqlite")
    ms = bench_variants("digits-cnn", arts, LocalDevice(workdir=str(tmp_path / "w")), "torch",
                        QUICK, rounds=1, store=store, run_id=store.begin_run({"t": 1}))
    for art, m in zip(arts, ms):
        assert m.ok, m.reason
        ev = art.manifest["eval_set"]
        assert m.accuracy["eval_sha256"] == ev["sha256"] and m.accuracy["n"] == ev["n"] == 450
        assert m.accuracy["simulated_top1"] == art.manifest["simulated"]["top1"]
        assert abs(m.accuracy["gap_top1"]) <= 0.005, m.accuracy
    assert ms[0].accuracy["agreement_fp32"] == 1.0 and ms[1].accuracy["sqnr_db"] < 60
    with np.load(evalset.load(arts[0]).path) as mine, np.load(onnx_ev.path) as theirs:
        assert mine["input:x"].tobytes() == theirs["input:input"].tobytes()
        np.testing.assert_allclose(mine["fp32:0"], theirs["fp32:0"], rtol=1e-4, atol=1e-4)


def _corrupt_one_weight_scale(art: Artifact, out) -> Artifact:
    """The same artifact with one layer's weight scale x8: what a broken export or a
    mis-read scale does on the engine, invisible to the fake-quant model."""
    m = onnx.load(art.path)
    inits = {i.name: i for i in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    scale = inits[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 8, scale.name))
    path = out / "corrupt.onnx"
    onnx.save(m, path)
    ev = evalset.load(art)
    shutil.copy(ev.path, out)
    shutil.copy(ev.manifest_path, out)
    manifest = {k: v for k, v in art.manifest.items() if k not in ("file", "sha256", "size_bytes")}
    return Artifact.create(path, **manifest)


def test_device_figure_is_measured_not_copied(digits, tmp_path):
    """A corrupt artifact keeps the simulation's figure (the manifest's) but the device's
    figure falls: the number comes from the engine."""
    arts, _ = digits
    bad = _corrupt_one_weight_scale(arts["w8a8"], tmp_path)
    m = LocalDevice(workdir=str(tmp_path / "w")).run(bad, QUICK, "ort",
                                                     evalset=evalset.load(bad))
    assert m.status == "ok", m.reason
    assert m.accuracy["sqnr_db"] < bad.manifest["simulated"]["sqnr_db"] - 3
    assert m.accuracy["agreement_fp32"] < 1.0 and m.accuracy["worst"]


def test_bench_json_carries_accuracy(digits, tmp_path, capsys):
    _, out = digits
    js = tmp_path / "b.json"
    rc = cli.main(["bench", "--model", "digits-cnn", "--variants", "fp32,w8a8", "--rounds", "1",
                   "--min-iters", "10", "--min-duration-s", "0.05", "--warmup-s", "0",
                   "--idle-s", "0.05", "--no-store", "--json", str(js)])
    assert rc == 0
    rows = json.loads(js.read_text())["measurements"]
    for row in rows:
        acc = row["accuracy"]
        assert set(acc) >= {"top1", "agreement_fp32", "kl", "sqnr_db", "simulated_top1", "n"}
        assert 0.0 <= acc["top1"] <= 1.0 and 0.0 <= acc["agreement_fp32"] <= 1.0
    assert "top-1 dev" in capsys.readouterr().out


# --- regression detection --------------------------------------------------------------

def test_accuracy_rule():
    v = regress.compare_accuracy([0.98, 0.98, 0.98], 0.97, 360, metric="top1")
    assert v.flagged and "dropped 1.00 pt" in v.note
    assert not regress.compare_accuracy([0.98, 0.98], 0.978, 360).flagged   # 0.2 pt
    assert not regress.compare_accuracy([0.98], 0.99, 360).flagged          # better
    small = regress.compare_accuracy([0.9], 0.89, 20)    # one sample of 20 is 5 pt
    assert not small.flagged and small.mde == pytest.approx(0.05)
    assert not regress.compare_accuracy([], 0.5, 10).flagged


def _night(store, top1: float, sha: str = "e" * 64) -> str:
    run_id = store.begin_run({"n": top1, "sha": sha})
    for r in range(2):
        m = Measurement("m", "w8a8", "dev", "ort", latency_ms={"p50": 1.0 + 0.001 * r},
                        samples_ms=[1.0, 1.0, 1.001],
                        accuracy={"n": 1000, "top1": top1, "agreement_fp32": top1,
                                  "eval_sha256": sha} if r == 0 else {})
        store.add_measurement(run_id, m, kind="bench", round=r)
    store.finish_run(run_id)
    return run_id


def test_device_top1_drop_is_a_regression(tmp_path):
    store = open_store(tmp_path / "s.sqlite")
    for _ in range(3):
        _night(store, 0.95)
    run = _night(store, 0.93)          # an engine upgrade that costs 2 points
    verdicts = {v["metric"]: v for v in regress.detect(store, run)}
    assert verdicts["top1"]["flagged"] and verdicts["agreement"]["flagged"]
    assert not verdicts["p50"]["flagged"]
    other = _night(store, 0.90, sha="f" * 64)   # another evaluation set: nothing to compare
    verdicts = {v["metric"]: v for v in regress.detect(store, other)}
    assert verdicts["top1"]["note"] == "no history" and not verdicts["top1"]["flagged"]


def test_migration_adds_accuracy_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    open_store(path).close()
    con = sqlite3.connect(path)        # make it a v2 store: drop the v3 columns and stamp
    for col in ("accuracy", "top1", "agreement_fp32", "eval_sha256", "load_peak_mb",
                "timed_peak_mb", "scenario", "scenario_valid", "scenario_value"):   # v3, v4
        con.execute(f"ALTER TABLE measurements DROP COLUMN {col}")
    con.execute("UPDATE schema_version SET version = 2")
    con.commit()
    con.close()
    store = open_store(path)
    assert store.schema_version() == 4
    run = _night(store, 0.9)
    assert [r["top1"] for r in store.measurements(run)] == [0.9, None]
