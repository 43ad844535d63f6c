"""Profiled agent runs (`profile_iters` > 0): per-engine-node times from each engine's own
profiler, mapped back to hilq's layers through the manifest's layer_map. Real artifacts of
digits-cnn, real ONNX Runtime / OpenVINO / PyTorch, the real local device and SQLite store."""

from __future__ import annotations

import argparse
import json

import pytest
from hilq.bench import runner
from hilq.bench.store import open_store
from hilq.devices import agent
from hilq.devices.local import LocalDevice
from hilq.devices.runtimes import OnnxNames
from hilq.devices.runtimes.tensorrt import layer_sources
from hilq.quant.export import build_artifact
from hilq.quant.models import load_model
from hilq.quant.pipeline import variant_bit_config
from hilq.quant.spec import BitConfig
from hilq.quant.transform import fold_bn

from hilq.measurement import Measurement, Protocol

ITERS = 12
PROTO = {"warmup_iters": 2, "warmup_s": 0.0, "threads": 1, "idle_s": 0.0,
         "profile_iters": ITERS}
FLOAT_IN_MIX = ("block.conv1", "block.conv2")   # a float pair: ORT cannot quantize them back
INT_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}
QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("profile-arts")
    folded = fold_bn(load_model("digits-cnn").build())
    int8 = variant_bit_config(folded, "w8a8")
    mix = BitConfig({k: v for k, v in int8.layers.items() if k not in FLOAT_IN_MIX})
    cfg = d / "mix.json"
    cfg.write_text(json.dumps(mix.to_dict()))
    return {v: build_artifact("digits-cnn", v, d, target="cpu", seed=0)
            for v in ("w8a8", "fp32")} | {
        "mix": build_artifact("digits-cnn", f"config:{cfg}", d, target="cpu", seed=0)}


def profiled(art, runtime: str, tmp_path, status: str = "ok", **proto) -> dict:
    """One profiled agent run in this process (devices.agent.run, as the script runs it)."""
    p = tmp_path / f"protocol-{runtime}.json"
    p.write_text(json.dumps({**PROTO, **proto}))
    args = argparse.Namespace(artifact=art.path, protocol=str(p), runtime=runtime,
                              reference=None, rtol=1e-3, atol=1e-4, scratch=str(tmp_path))
    out = agent.run(args)
    assert out["status"] == status, out.get("reason")
    return out


def layers_of(art) -> dict[str, str]:
    """hilq layer -> its precision in the artifact's layer_map."""
    return {v["layer"]: v["precision"] for v in art.manifest["layer_map"].values()}


def nodes_of(prof: dict, layer: str) -> list[dict]:
    return [n for n in prof["nodes"] if layer in (n.get("layers") or [n["layer"]])]


def check_consistent(prof: dict) -> None:
    nodes = prof["nodes"]
    assert prof["iters"] == ITERS and nodes
    assert prof["total_ms"] > 0
    assert prof["total_ms"] == pytest.approx(sum(n["ms"] for n in nodes))
    assert prof["total_ms"] == pytest.approx(sum(prof["layer_ms"].values()) + prof["other_ms"])
    assert prof["other_ms"] == pytest.approx(sum(prof["other_by_op"].values()))
    for n in nodes:
        assert {"name", "op", "ms", "sources", "exec", "layer"} <= set(n), n
        assert n["ms"] >= 0 and isinstance(n["sources"], list)


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_w8a8_profile_maps_every_layer_to_integer_kernels(arts, runtime, tmp_path):
    art = arts["w8a8"]
    out = profiled(art, runtime, tmp_path)
    prof = out["profile"]
    check_consistent(prof)
    assert not out.get("latency_ms") and not out.get("samples_ms")   # no timing claimed
    assert out["timing"]["mode"] == "profile" and out["timing"]["profile_iters"] == ITERS
    assert out["kernels"]["integer"] and not out["kernels"]["float"]    # still recorded
    layers = layers_of(art)
    assert len(layers) == 6 and set(layers.values()) == {"w8a8"}
    assert prof["unmapped_layers"] == []
    for layer in layers:
        assert prof["layer_ms"].get(layer, 0) > 0, (layer, prof["layer_ms"])
        nodes = nodes_of(prof, layer)
        if runtime == "ort":
            assert {n["op"] for n in nodes} & INT_OPS, (layer, nodes)
        else:
            assert any("i8" in (n["exec"] or "").lower() or "u8" in (n["exec"] or "").lower()
                       for n in nodes), (layer, nodes)
    # the engines' compute nodes all mapped: none of them is left in "other"
    assert not set(prof["other_by_op"]) & (INT_OPS | {"Convolution", "FullyConnected"})
    assert prof["mapped_fraction"] > 0.4


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_fp32_profile_maps_fused_float_nodes(arts, runtime, tmp_path):
    art = arts["fp32"]
    prof = profiled(art, runtime, tmp_path)["profile"]
    check_consistent(prof)
    for layer in layers_of(art):
        assert prof["layer_ms"].get(layer, 0) > 0, (layer, prof["layer_ms"])
        for n in nodes_of(prof, layer):
            assert n["op"] not in INT_OPS and "i8" not in (n["exec"] or "").lower(), n
    if runtime == "ort":
        # NCHWc convs are named after their output tensor (a fused Relu's, on stem):
        # `/stem/stem.2/Relu_output_0_nchwc` must still land on stem.0
        stem = nodes_of(prof, "stem.0")
        assert any(n["name"].endswith("_nchwc") for n in stem), stem
        assert "/stem/stem.0/Conv" in stem[0]["sources"]
        assert prof["other_by_op"].get("ReorderOutput", 0) > 0    # reorders: no layer
    else:
        # OpenVINO names the fc FullyConnected after the graph output tensor (`output`)
        fc = nodes_of(prof, "fc")
        assert fc and fc[0]["sources"] == ["/fc/Gemm"] and fc[0]["op"] == "FullyConnected"


def test_mixed_profile_shows_qdq_boundaries_on_ort(arts, tmp_path):
    mixed = profiled(arts["mix"], "ort", tmp_path)["profile"]
    uniform = profiled(arts["w8a8"], "ort", tmp_path)["profile"]
    check_consistent(mixed)
    assert set(QDQ) <= set(mixed["other_by_op"]), mixed["other_by_op"]
    count = lambda p: sum(n["op"] in QDQ for n in p["nodes"])   # noqa: E731
    assert count(mixed) > count(uniform)       # the float island adds Q/DQ boundaries
    precision = layers_of(arts["mix"])
    assert {lay for lay, p in precision.items() if p == "fp32"} == set(FLOAT_IN_MIX)
    for layer, p in precision.items():
        ops = {n["op"] for n in nodes_of(mixed, layer)}
        assert mixed["layer_ms"][layer] > 0
        assert bool(ops & INT_OPS) == (p == "w8a8"), (layer, p, ops)


def test_mixed_profile_on_openvino(arts, tmp_path):
    prof = profiled(arts["mix"], "openvino", tmp_path)["profile"]
    check_consistent(prof)
    for layer, p in layers_of(arts["mix"]).items():
        execs = " ".join(n["exec"] or "" for n in nodes_of(prof, layer)).lower()
        assert prof["layer_ms"][layer] > 0
        assert ("i8" in execs or "u8" in execs) == (p == "w8a8"), (layer, p, execs)


def test_profile_summary_splits_fused_layers_and_keeps_the_rest():
    manifest = {"layer_map": {"/a/Conv": {"layer": "a"}, "/b/Conv": {"layer": "b"}}}
    nodes = [{"name": "ab", "op": "Fused", "ms": 3.0, "sources": ["/a/Conv", "/b/Conv"]},
             {"name": "b2", "op": "Conv", "ms": 1.0, "sources": ["/b/Conv", "/b/Relu"]},
             {"name": "t", "op": "Transpose", "ms": 0.5, "sources": []},
             {"name": "q", "op": "QuantizeLinear", "ms": 0.25, "sources": ["/x_Q"]}]
    s = agent.profile_summary(nodes, manifest, 4)
    assert s["layer_ms"] == {"a": 1.5, "b": 2.5}
    assert s["nodes"][0]["layer"] == "a" and s["nodes"][0]["layers"] == ["a", "b"]
    assert [n["layer"] for n in s["nodes"][1:]] == ["b", None, None]
    assert s["other_ms"] == 0.75 and s["other_by_op"] == {"Transpose": 0.5, "QuantizeLinear": 0.25}
    assert s["total_ms"] == 4.75 and s["mapped_fraction"] == pytest.approx(4 / 4.75)
    assert s["unmapped_layers"] == []
    assert agent.profile_summary(nodes[2:], manifest, 4)["unmapped_layers"] == ["a", "b"]


def test_tensorrt_layer_names_split_into_onnx_nodes(arts):
    names = OnnxNames.of(arts["fp32"].path)
    assert layer_sources("/stem/stem.0/Conv + /stem/stem.2/Relu", names) == \
        ["/stem/stem.0/Conv", "/stem/stem.2/Relu"]
    assert layer_sources("PWN(/block/Add, /block/relu_1/Relu)", names) == \
        ["/block/Add", "/block/relu_1/Relu"]
    assert layer_sources("{ForeignNode[/down/down.0/Conv.../fc/Gemm]}", names) == \
        ["/down/down.0/Conv", "/fc/Gemm"]
    assert layer_sources("Reformatting CopyNode for Input Tensor 0 to /fc/Gemm", names) == []


def test_torch_eager_profile_names_modules(tmp_path):
    art = build_artifact("digits-cnn", "w8a8", tmp_path, target="torch", seed=0)
    # eager PT2E computes on dequantized tensors: float kernels, so the run says degraded
    prof = profiled(art, "torch", tmp_path, "degraded",
                    runtime_options={"mode": "eager"})["profile"]
    check_consistent(prof)
    want = {"stem.0", "block.conv1", "block.conv2", "down.0", "conv.0", "fc"}
    assert set(prof["layer_ms"]) == want and all(v > 0 for v in prof["layer_ms"].values())
    for layer in want:    # the conv/linear op itself is among the layer's nodes
        assert any(n["op"] in ("aten.conv2d.default", "aten.linear.default")
                   for n in nodes_of(prof, layer)), layer
    assert prof["other_by_op"]    # activations, quantize ops: no layer


def test_profile_artifacts_through_local_device_and_store(arts, tmp_path):
    store = open_store(tmp_path / "hilq.sqlite")
    run_id = store.begin_run({"what": "profile test"})
    dev = LocalDevice(workdir=str(tmp_path / "work"))
    calls = []
    real = dev.run
    dev.run = lambda art, proto, *a, **k: calls.append(proto) or real(art, proto, *a, **k)
    base = Protocol(warmup_iters=2, warmup_s=0.0, min_iters=5, min_duration_s=0.0, threads=1,
                    idle_s=0.0)
    chosen = {"int8": arts["w8a8"], "mix": arts["mix"]}
    lines = []
    got = runner.profile_artifacts(dev, "ort", "digits-cnn", chosen, base, iters=ITERS,
                                   store=store, run_id=run_id, on_result=lines.append)
    assert [p.profile_iters for p in calls] == [ITERS, ITERS] and base.profile_iters == 0
    assert set(got) == set(chosen) and len(lines) == 2
    for name, m in got.items():
        assert m.ok and m.variant == name and m.latency_ms == {}, m.reason
        assert m.protocol["profile_iters"] == ITERS
        assert m.profile["iters"] == ITERS and m.profile["total_ms"] > 0
        assert set(m.profile["layer_ms"]) == set(layers_of(chosen[name]))
    rows = store.measurements(run_id, kind="profile")
    assert {r["variant"] for r in rows} == set(chosen)
    for r in rows:
        assert r["extra"]["profile"] == json.loads(json.dumps(got[r["variant"]].profile))
        assert r["p50_ms"] is None and r["status"] == "ok"
    # a resumed run takes them from the store, profile included, and runs nothing
    again = runner.profile_artifacts(dev, "ort", "digits-cnn", chosen, base, iters=ITERS,
                                     store=store, run_id=run_id)
    assert len(calls) == 2
    assert {k: v.profile for k, v in again.items()} == \
        {k: json.loads(json.dumps(v.profile)) for k, v in got.items()}
    assert Measurement.from_dict(got["int8"].to_dict()).profile == got["int8"].profile
    store.close()
