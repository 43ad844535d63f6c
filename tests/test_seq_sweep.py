"""`hilq bench --seq-len 16,32`: one static-shape artifact and measurement per sequence length
of tiny-transformer in one bench, stored with its shape and plotted in tokens/s."""

from __future__ import annotations

import json

import pytest
import torch
from hilq.bench import cli
from hilq.bench.report import render
from hilq.bench.store import open_store
from hilq.quant.models import ModelError, ModelRef, load_model

_SHORT = ["--rounds", "1", "--min-iters", "10", "--min-duration-s", "0.2", "--warmup-s", "0",
          "--threads", "1"]


def _bench(tmp_path, capsys, *extra):
    db, out = tmp_path / "r.sqlite", tmp_path / "sweep.json"
    rc = cli.main(["bench", "--model", "tiny-transformer", "--variants", "fp32,w8a8",
                   *extra, *_SHORT, "--db", str(db), "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    return db, json.loads(out.read_text())["measurements"]


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_seq_len_sweep_measures_each_length_and_the_report_plots_it(tmp_path, capsys, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    db, ms = _bench(tmp_path, capsys, "--seq-len", "16,32", "--runtime", runtime)
    got = {(m["variant"], m["protocol"]["seq_len"], tuple(m["timing"]["input_shapes"]["input"]))
           for m in ms}
    assert got == {("fp32@s16", 16, (1, 16, 256)), ("w8a8@s16", 16, (1, 16, 256)),
                   ("fp32@s32", 32, (1, 32, 256)), ("w8a8@s32", 32, (1, 32, 256))}
    for m in ms:        # each length evaluated on its own evaluation set, through the engine
        assert m["accuracy"]["n"] > 0 and m["accuracy"]["agreement_fp32"] > 0.5
    assert len({m["artifact_sha256"] for m in ms}) == 4
    store = open_store(db)
    rows = store.rows("measurements")
    assert sorted(r["variant"] for r in rows) == ["fp32@s16", "fp32@s32", "w8a8@s16", "w8a8@s32"]
    rep = render(store, "latest", tmp_path / "rep")
    assert rep.sections["Sequence-length sweep"] and not rep.sections["Batch sweep"]
    md = rep.markdown.read_text().split("## Sequence-length sweep")[1].split("\n## ")[0]
    assert "tokens/s" in md and "seq_len_sweep.png" in md
    assert f"| tiny-transformer | w8a8 | local/{runtime} | 32 |" in md
    row = next(r for r in md.splitlines() if f"| tiny-transformer | fp32 | local/{runtime} | 32 |" in r)
    m32 = next(m for m in ms if m["variant"] == "fp32@s32")     # tokens/s = sequences/s × 32
    assert float(row.split("|")[7]) == pytest.approx(32 * m32["throughput"], rel=1e-3)
    assert (rep.dir / "plots" / "seq_len_sweep.png").stat().st_size > 1000


def test_seq_len_with_a_batch_sweep_is_the_product(tmp_path, capsys):
    _, ms = _bench(tmp_path, capsys, "--seq-len", "8,16", "--batch", "1,2", "--variants", "fp32")
    got = {(m["variant"], tuple(m["timing"]["input_shapes"]["input"])) for m in ms}
    assert got == {("fp32@b1s8", (1, 8, 256)), ("fp32@b2s8", (2, 8, 256)),
                   ("fp32@b1s16", (1, 16, 256)), ("fp32@b2s16", (2, 16, 256))}


def test_every_length_runs_the_same_weights():
    """The positional table is one draw sliced to the length: the default length's model is
    the 64-row prefix, and a shorter model agrees with it on the shared positions' weights."""
    ref = load_model("tiny-transformer").build().state_dict()
    short = load_model(ModelRef("tiny-transformer", seq_len=16)).build().state_dict()
    assert short["pos"].shape == (16, 256) and torch.equal(short["pos"], ref["pos"][:16])
    assert all(torch.equal(short[k], v) for k, v in ref.items() if k != "pos")
    with pytest.raises(ModelError, match="--seq-len"):
        load_model(ModelRef("digits-cnn", seq_len=16))


def test_bad_seq_len_is_one_line(capsys):
    cases = [("digits-cnn", "16", "no sequence axis"), ("resnet18", "16,32", "no sequence axis"),
             ("tiny-transformer", "0", "positive"), ("tiny-transformer", "-4", "positive"),
             ("tiny-transformer", "16,16", "distinct"), ("tiny-transformer", "x", "integers"),
             ("tiny-transformer", "1.5", "integers"), ("tiny-transformer", "5000", "1..1024")]
    for model, bad, why in cases:
        assert cli.main(["bench", "--model", model, "--seq-len", bad, "--no-store"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--seq-len" in err[0] and why in err[0], (model, bad, err)


def test_tensorrt_profile_pins_only_the_batch():
    """TensorRT's optimization profile gets the batch at axis 0; a static length passes through,
    a dynamic axis besides the batch takes the manifest's shape, and is refused rather than
    given the batch size where none is given."""
    from hilq.devices.runtimes.tensorrt import static_shape

    assert static_shape("input", (-1, 64, 256), 8) == (8, 64, 256)
    with pytest.raises(RuntimeError, match="dynamic dimension 1"):
        static_shape("input", (-1, -1, 256), 8)
    assert static_shape("input", (-1, -1, 256), 8, {"input": [1, 32, 256]}) == (8, 32, 256)
