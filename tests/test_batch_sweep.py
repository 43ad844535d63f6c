"""`hilq bench --batch 1,4`: one measurement per batch in one bench, stored and plotted."""

from __future__ import annotations

import json

import pytest
from hilq.bench import cli
from hilq.bench.report import render
from hilq.bench.store import open_store


def test_batch_sweep_measures_each_shape_and_the_report_plots_it(tmp_path, capsys):
    db, out = tmp_path / "r.sqlite", tmp_path / "sweep.json"
    rc = cli.main(["bench", "--model", "digits-cnn", "--variants", "fp32,w8a8", "--batch", "1,4",
                   "--rounds", "2", "--min-iters", "30", "--min-duration-s", "0.2",
                   "--warmup-s", "0", "--threads", "1", "--db", str(db), "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    ms = json.loads(out.read_text())["measurements"]
    got = {(m["variant"], m["protocol"]["batch"], m["timing"]["batch"]) for m in ms}
    assert got == {("fp32@b1", 1, 1), ("w8a8@b1", 1, 1), ("fp32@b4", 4, 4), ("w8a8@b4", 4, 4)}
    for m in ms:        # throughput counts samples: batch × calls / wall time
        b = m["protocol"]["batch"]
        assert m["throughput"] > 0 and m["latency_ms"]["p50"] > 0
        assert m["throughput"] * m["latency_ms"]["mean"] / 1000 == pytest.approx(b, rel=0.35)
    store = open_store(db)
    rep = render(store, "latest", tmp_path / "rep")
    assert rep.sections["Batch sweep"]
    md = rep.markdown.read_text().split("## Batch sweep")[1].split("\n## ")[0]
    assert "| digits-cnn | w8a8 | local/ort | 4 |" in md and "batch_sweep.png" in md
    assert (rep.dir / "plots" / "batch_sweep.png").stat().st_size > 1000


def test_bad_batch_lists_are_one_line(capsys):
    for bad in ("0", "1,x", "8,8", ""):
        assert cli.main(["bench", "--model", "digits-cnn", "--batch", bad, "--no-store"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--batch" in err[0], err
