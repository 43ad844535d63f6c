"""`hilq quantize` end to end: the table, the JSON, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hilq.bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"model", "fp32_top1", "quant_top1", "fp32_size_bytes", "quant_size_bytes", "bit_config",
        "seconds", "variant", "calib", "repairs", "granularity"}


def hilq(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hilq", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_w8a8_digits_json_and_accuracy(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["quantize", "--model", "digits-cnn", "--w-bits", "8", "--a-bits", "8",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "FP32" in table and "W8A8" in table
    res = json.loads(out.read_text())
    assert KEYS <= set(res)
    assert res["model"] == "digits-cnn" and res["variant"] == "w8a8"
    assert 0.95 <= res["fp32_top1"] <= 1.0 and 0.0 <= res["quant_top1"] <= 1.0
    assert abs(res["fp32_top1"] - res["quant_top1"]) <= 0.005
    assert res["quant_size_bytes"] * 3.5 < res["fp32_size_bytes"]
    layers = res["bit_config"]
    assert "stem.0" in layers and layers["stem.0"]["weight"]["bits"] == 8
    assert layers["fc"]["act"]["bits"] == 8 and layers["fc"]["weight"]["granularity"] == "channel"


@pytest.mark.slow
def test_low_bits_and_repair_change_the_result(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["quantize", "--model", "digits-cnn", "--w-bits", "2", "--a-bits", "8",
                 "--json", str(a)]) == 0
    assert main(["quantize", "--model", "digits-cnn", "--w-bits", "2", "--a-bits", "8",
                 "--repair", "bias", "--json", str(b)]) == 0
    plain, fixed = json.loads(a.read_text()), json.loads(b.read_text())
    assert plain["quant_top1"] < plain["fp32_top1"] - 0.2     # W2 visibly costs accuracy
    assert fixed["repairs"] == ["bias"] and fixed["quant_top1"] > plain["quant_top1"]


def test_user_model_weight_only_group(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    out = tmp_path / "u.json"
    assert main(["quantize", "--model", "tests.quantize_user_model:build",
                 "--data", "tests.quantize_user_model:data", "--w-bits", "4", "--a-bits", "16",
                 "--granularity", "group", "--group-size", "16", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["fp32_top1"] == 1.0 and res["a_bits"] is None and res["variant"] == "w4a16"
    assert res["bit_config"]["0"]["weight"]["granularity"] == "group"
    assert res["bit_config"]["0"]["act"] is None
    # 32 inputs to the last layer: a multiple of 16, so grouped too.
    assert res["bit_config"]["3"]["weight"]["group_size"] == 16


@pytest.mark.parametrize("args,message", [
    (["--w-bits", "0", "--a-bits", "8"], "w_bits 0: must be 1..8"),
    (["--w-bits", "9", "--a-bits", "8"], "w_bits 9: must be 1..8"),
    (["--w-bits", "8", "--a-bits", "0"], "a_bits 0: must be 1..8"),
    (["--w-bits", "4", "--a-bits", "4", "--calib", "magic"], "unknown calib 'magic'"),
    (["--w-bits", "4", "--a-bits", "4", "--repair", "bias,voodoo"], "'voodoo'"),
    (["--w-bits", "4", "--a-bits", "4", "--granularity", "row"], "unknown granularity 'row'"),
    (["--w-bits", "4", "--a-bits", "4", "--calib-data", "dreams"], "unknown calib_data 'dreams'"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(["quantize", "--model", "digits-cnn", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("hilq quantize: error:")


def test_bad_input_subprocess():
    r = hilq("quantize", "--model", "digits-cnn", "--w-bits", "9", "--a-bits", "8")
    assert r.returncode == 2 and r.stderr.strip() == "hilq quantize: error: w_bits 9: must be 1..8"
    r = hilq("quantize", "--model", "tests.quantize_user_model:build", "--data",
             "tests.no_such_data_module:data", "--w-bits", "8", "--a-bits", "8")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "tests.no_such_data_module" in r.stderr


def test_unknown_model_lists_builtins(capsys):
    assert main(["quantize", "--model", "no-such-net", "--w-bits", "8", "--a-bits", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown model 'no-such-net'" in err and "resnet18" in err and "digits-cnn" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("hilq ")


def test_user_model_without_data_flag(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    assert main(["quantize", "--model", "tests.quantize_user_model:build", "--w-bits", "8",
                 "--a-bits", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs --data" in err


def test_json_into_missing_directory(tmp_path, capsys):
    bad = tmp_path / "nope" / "out.json"
    assert main(["quantize", "--model", "digits-cnn", "--w-bits", "8", "--a-bits", "8",
                 "--json", str(bad)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pipeline_weight_only_transformer_sizes_and_agreement():
    from hilq.quant.models import load_model
    from hilq.quant.pipeline import quantize_model, variant_bit_config

    entry = load_model("tiny-transformer")
    model = entry.build()
    notes: list[str] = []
    cfg = variant_bit_config(model, "w4a16", granularity="group", group_size=128, notes=notes)
    assert notes == [] and all(p.weight.granularity == "group" and p.act is None
                               for p in cfg.layers.values())
    res = quantize_model(entry, cfg, model=model)
    assert res.fp32_top1 is None and res.quant_top1 is None      # no labels
    assert res.agreement is not None and 0.0 <= res.agreement.top1 <= 1.0
    linear = sum(model.get_submodule(n).weight.numel() for n in cfg.layers)
    biases = sum(model.get_submodule(n).bias.numel() for n in cfg.layers)
    others = sum(p.numel() for p in model.parameters()) - linear - biases
    assert res.fp32_size_bytes == 4 * sum(p.numel() for p in model.parameters())
    # 4-bit codes + one float32 scale (and a 4-bit zero-point if asymmetric) per 128-group
    qparam_bits = 0
    for n, p in cfg.layers.items():
        out_f, in_f = model.get_submodule(n).weight.shape
        qparam_bits += out_f * -(-in_f // 128) * (32 + (0 if p.weight.symmetric else 4))
    assert res.quant_size_bytes == (linear * 4 + qparam_bits) // 8 + 4 * (biases + others)


def test_group_granularity_falls_back_per_layer_with_a_note():
    from hilq.quant.models import load_model
    from hilq.quant.pipeline import parse_repairs, variant_bit_config

    model = load_model("digits-cnn").build()
    notes: list[str] = []
    cfg = variant_bit_config(model, "w4a8", granularity="group", group_size=9, notes=notes)
    # stem (1x3x3 = 9) groups; block.conv1 (12x3x3 = 108) is a multiple of 9 too; fc (24) is not.
    assert cfg.layers["stem.0"].weight.granularity == "group"
    assert cfg.layers["fc"].weight.granularity == "channel"
    assert len(notes) == 1 and "fc" in notes[0]
    assert parse_repairs("adaround, bias,cle") == ("cle", "bias", "adaround")
    assert parse_repairs(None) == ()


@pytest.mark.slow
def test_noise_calibration_is_recorded(tmp_path):
    out = tmp_path / "n.json"
    assert main(["quantize", "--model", "digits-cnn", "--w-bits", "8", "--a-bits", "8",
                 "--calib-data", "noise", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["calib_data"] == "noise" and any("noise" in n for n in res["notes"])


def test_qat_without_training_labels_is_a_one_line_error(capsys):
    from hilq.bench.cli import main

    rc = main(["quantize", "--model", "resnet18", "--w-bits", "8", "--a-bits", "8",
               "--qat-epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no labelled training data" in err[0]


def test_size_counts_scales_and_zero_points_by_granularity():
    """Group-wise INT4 with group 32 stores a float32 scale per 32 weights: 5 bits/weight,
    not 4; asymmetric grids add a zero-point per scale; float layers stay 32 bits."""
    from hilq.quant.spec import BitConfig, LayerPrecision, QuantSpec
    from hilq.quant.transform import layer_infos, size_bits
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 4))
    infos = layer_infos(model, (64,))
    assert infos["0"].shape == (16, 64)

    def bits(spec: QuantSpec) -> int:
        return size_bits(infos, BitConfig({"0": LayerPrecision(spec)})) - 4 * 16 * 32 - 4 * 32

    assert bits(QuantSpec(4, granularity="group", group_size=32)) == 16 * 64 * 4 + 16 * 2 * 32
    assert bits(QuantSpec(4, granularity="group", group_size=32)) / (16 * 64) == 5.0
    assert bits(QuantSpec(8, granularity="channel")) == 16 * 64 * 8 + 16 * 32
    assert bits(QuantSpec(8, symmetric=False)) == 16 * 64 * 8 + 32 + 8
    assert size_bits(infos, BitConfig({})) == (16 * 64 + 16 * 4 + 4) * 32
