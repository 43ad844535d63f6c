"""Each runtime declares the artifact it consumes and the options it takes (devices/runtimes):
the declaration chooses what `hilq bench` builds, and `--runtime-option` reaches the engine
and is recorded with the measurement; anything else is a one-line error."""

from __future__ import annotations

import json

import pytest
from hilq.bench import cli, config
from hilq.bench.runner import artifact_for, target_for
from hilq.devices.runtimes import NAMES, Consumes, check_options, declaration
from hilq.quant.artifact import Artifact


@pytest.mark.parametrize("name", NAMES)
def test_every_runtime_declares_its_artifact_and_options(name):
    consumes, options = declaration(name)
    assert isinstance(consumes, Consumes)
    assert consumes.format in ("onnx-qdq", "torch-pt2") and consumes.device in ("cpu", "cuda")
    assert target_for(name) == (consumes.target, consumes.device)
    for key, opt in options.items():
        assert check_options(name, {key: opt.default}) == {key: opt.default}


def test_torch_cuda_gets_cuda_artifacts_because_it_says_so(tmp_path):
    """The bug this fixes: `target_for("torch-cuda")` returned "torch", a CPU .pt2."""
    assert declaration("torch-cuda")[0].device == "cuda"
    for v in ("fp16", "w8a8", "w4a16"):
        art = artifact_for("digits-cnn", v, tmp_path, "torch-cuda")
        m = Artifact.load(art.path).manifest
        assert m["settings"]["device"] == "cuda" and m["runtimes"] == ["torch-cuda"], m
        assert m["settings"]["quantized_at_load"] is True and m["variant"] == v
    assert Artifact.load(artifact_for("digits-cnn", "fp32", tmp_path, "torch").path
                         ).manifest["settings"]["device"] == "cpu"


def _bench(tmp_path, runtime, *opts):
    out = tmp_path / f"{runtime}.json"
    rc = cli.main(["bench", "--model", "digits-cnn", "--variants", "fp32", "--runtime", runtime,
                   "--rounds", "1", "--min-iters", "5", "--min-duration-s", "0.01",
                   "--warmup-s", "0", "--no-store", "--json", str(out),
                   *[a for o in opts for a in ("--runtime-option", o)]])
    assert rc == 0
    (m,) = json.loads(out.read_text())["measurements"]
    return m


def test_options_reach_ort_and_openvino_and_are_recorded(tmp_path):
    m = _bench(tmp_path, "ort", "graph_optimization_level=basic", "x64_quant_precision=true")
    eng = m["facts"]["engine"]
    assert eng["graph_optimization_level"] == "ORT_ENABLE_BASIC" and eng["x64_quant_precision"]
    assert m["protocol"]["runtime_options"] == {"graph_optimization_level": "basic",
                                                "x64_quant_precision": True}
    m = _bench(tmp_path, "openvino", "hint=throughput")
    eng = m["facts"]["engine"]
    assert eng["compiled"]["PERFORMANCE_HINT"] == "THROUGHPUT", eng["compiled"]
    assert m["protocol"]["runtime_options"] == {"hint": "throughput"}
    default = _bench(tmp_path, "openvino")
    assert default["facts"]["engine"]["compiled"]["PERFORMANCE_HINT"] == "LATENCY"


@pytest.mark.parametrize("opt, says", [
    ("nope=1", "runtime ort has no option 'nope' (its options: graph_optimization_level"),
    ("x64_quant_precision=maybe", "x64_quant_precision='maybe': expected bool"),
    ("graph_optimization_level=max", "use disable, basic, extended, all"),
    ("graph_optimization_level", "--runtime-option 'graph_optimization_level': expected KEY=VALUE"),
])
def test_bad_runtime_options_are_one_line(opt, says, capsys):
    assert cli.main(["bench", "--model", "digits-cnn", "--runtime", "ort", "--no-store",
                     "--runtime-option", opt]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_nightly_config_takes_runtime_options_per_runtime():
    base = {"bench": [{"model": "digits-cnn", "variants": ["fp32"],
                       "runtimes": ["ort", "openvino"]}]}
    base["bench"][0]["runtime_options"] = {"openvino": {"hint": "throughput"}}
    cfg = config.parse(base)
    assert cfg.bench[0].runtime_options == {"openvino": {"hint": "throughput"}}
    base["bench"][0]["runtime_options"] = {"openvino": {"hint": "fastest"}}
    with pytest.raises(config.ConfigError, match="runtime_options.openvino: runtime option hint"):
        config.parse(base)
    base["bench"][0]["runtime_options"] = {"tensorrt": {"cuda_graph": True}}
    with pytest.raises(config.ConfigError, match="not one of this entry's runtimes"):
        config.parse(base)
