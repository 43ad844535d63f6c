"""`hilq compare` and `hilq report --index` on real SQLite stores built here: a 15% slowdown
with low noise is "slower" (exit 3), a rerun of the same code is "no change" (exit 0), and
the index of three runs shows their commits in order, error bars from the stored CIs, and a
link to each run's report."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from hilq.bench import regress
from hilq.bench.cli import main
from hilq.bench.report import plots
from hilq.bench.store import open_store

from hilq.measurement import Measurement
from hilq.stats import Stats

MEDIANS = {"fp32": 20.0, "w8a8": 9.0}
EVAL = "e" * 64


def add_run(store, n: int, slow: dict | None = None, *, rounds: int = 3, flips: int = 0,
            variants: dict = MEDIANS) -> str:
    """One run: every variant in `rounds` rounds of 200 samples, round noise 0.3%, sample
    noise 1%; `slow[v]` multiplies variant v; the first round carries device accuracy with
    `flips` of 1000 samples wrong that were right."""
    rng = np.random.default_rng(n)
    run = store.begin_run({"run": n}, seed=n)
    for r in range(rounds):
        for v, median in variants.items():
            s = (median * (slow or {}).get(v, 1.0) * rng.lognormal(0, 0.003)
                 * rng.lognormal(0, 0.01, 200))
            st = Stats(s)
            acc = {"n": 1000, "top1": 0.70 - flips / 1000, "eval_sha256": EVAL,
                   "per_sample": {"top1": "1" * (700 - flips) + "0" * (300 + flips)}}
            store.add_measurement(run, Measurement(
                "resnet18", v, "local", "onnxruntime", samples_ms=s.round(5).tolist(),
                latency_ms={"p50": st.p50, "mean": st.mean, "ci95_p50": st.ci95_p50},
                accuracy=acc if r == 0 else {}), round=r)
    store.finish_run(run)
    return run


def compare(capsys, db, *args) -> tuple[int, str, str]:
    code = main(["compare", *args, "--db", str(db)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fifteen_percent_slower_is_slower_and_exits_3(tmp_path, capsys):
    db = tmp_path / "hilq.sqlite"
    with open_store(db) as store:
        a = add_run(store, 1)
        b = add_run(store, 2, {"w8a8": 1.15}, flips=20)
    code, out, err = compare(capsys, db, a, b, "--out", str(tmp_path / "cmp"),
                             "--json", str(tmp_path / "cmp.json"))
    print(out)
    assert code == 3, err
    got = json.loads((tmp_path / "cmp.json").read_text())
    rows = {r["key"]["variant"]: r for r in got["rows"]}
    assert rows["w8a8"]["verdict"] == "slower" and rows["fp32"]["verdict"] == "no change"
    assert 1.13 < rows["w8a8"]["ratio"] < 1.17
    assert [r["key"]["variant"] for r in got["rows"]] == ["w8a8", "fp32"]     # by ratio
    ci = rows["w8a8"]["ci_b"]
    assert ci["source"] == "rounds" and ci["lo"] < rows["w8a8"]["b"] < ci["hi"]
    acc = rows["w8a8"]["accuracy"][0]
    assert acc["verdict"] == "lower" and "exact McNemar" in acc["note"]      # 20 of 1000
    line = next(x for x in out.splitlines() if "w8a8" in x)
    assert "slower" in line and "1.1" in line
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| resnet18 w8a8 on local/onnxruntime |" in md and "slower" in md
    assert "significantly slower in B" in (tmp_path / "cmp" / "compare.html").read_text()


def test_identical_runs_are_no_change_and_exit_0(tmp_path, capsys):
    db = tmp_path / "hilq.sqlite"
    with open_store(db) as store:
        add_run(store, 1)
        add_run(store, 2)
    code, out, err = compare(capsys, db, "previous", "latest", "--json",
                             str(tmp_path / "cmp.json"), "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert {r["verdict"] for r in rows} == {"no change"} and len(rows) == 2
    assert {a["verdict"] for r in rows for a in r["accuracy"]} == {"no change"}


def test_faster_is_faster_and_exits_0(tmp_path, capsys):
    db = tmp_path / "hilq.sqlite"
    with open_store(db) as store:
        a = add_run(store, 1)
        b = add_run(store, 2, {"fp32": 0.85})
    code, out, _ = compare(capsys, db, a, b, "--out", str(tmp_path / "cmp"))
    assert code == 0
    assert "faster" in next(x for x in out.splitlines() if "fp32" in x)


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    db = tmp_path / "hilq.sqlite"
    with open_store(db) as store:
        a = add_run(store, 1)
        b = add_run(store, 2, variants={"w4a8": 7.5})
    code, out, err = compare(capsys, db, a, "nope")
    assert code == 2 and err.count("\n") == 1 and "no run 'nope'" in err
    code, out, err = compare(capsys, db, a, b)
    assert code == 2 and err.count("\n") == 1 and "no series in common" in err


def test_index_lists_commits_in_order_with_error_bars_and_links(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    shas = iter(["aaaa1111" * 5, "bbbb2222" * 5, "cccc3333" * 5])
    monkeypatch.setattr(sys.modules["hilq.bench.store.db"], "git_sha", lambda: next(shas))
    many = {f"v{i:02d}": 1.0 + i for i in range(13)}        # 13 series: two figures
    store = open_store(tmp_path / "hilq.sqlite")
    runs = [add_run(store, n, {"v03": 1.3} if n == 2 else None, rounds=1, variants=many)
            for n in range(3)]
    for run in runs:
        regress.detect(store, run)
    cis = {run: {r["variant"]: r["latency"]["ci95_p50"] for r in store.measurements(run)}
           for run in runs}
    store.close()
    (tmp_path / "reports" / runs[0]).mkdir(parents=True)
    (tmp_path / "reports" / runs[0] / "report.html").write_text("<html></html>")
    calls = []
    real = plots.ci_trends

    def spy(panels, *a, **kw):
        calls.append(panels)
        fig = real(panels, *a, **kw)
        assert any(type(c).__name__ == "ErrorbarContainer" for c in fig.axes[0].containers)
        return fig

    monkeypatch.setattr(plots, "ci_trends", spy)
    assert main(["report", "--index", "--db", str(tmp_path / "hilq.sqlite")]) == 0
    page = (tmp_path / "reports" / "index.html").read_text()
    first = [page.index(s) for s in ("aaaa1111", "bbbb2222", "cccc3333")]
    assert first == sorted(first)
    for run in runs:
        assert f'<a href="{run}/report.html">report</a>' in page
    assert page.count("not rendered") == 2
    assert "REGRESSION" in page and "v03" in page
    assert [len(c) for c in calls] == [12, 1]        # every series, none cut
    panel = dict(calls[0])["v00 · local/onnxruntime"]
    assert [p["label"] for p in panel] == ["aaaa1111", "bbbb2222", "cccc3333"]
    assert [[p["lo"], p["hi"]] for p in panel] == [cis[r]["v00"] for r in runs]
    assert [p["source"] for p in panel] == ["stored"] * 3
    assert [p["flagged"] for p in dict(calls[0])["v03 · local/onnxruntime"]] == [
        False, False, True]
    assert not re.search(r"<script|<link|src=\"(?!data:)", page)
    md = (tmp_path / "reports" / "index.md").read_text()
    assert f"[report]({runs[2]}/report.html)" in md and "plots/index-resnet18-2.png" in md


def test_help_documents_exit_3(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "3 when at least one is" in capsys.readouterr().out


def test_a_p_value_too_small_for_a_float_is_not_printed_as_zero():
    """Seen in `hilq compare`: 1.1% on a 19 µs series with tight CIs gave p = 0.0, printed "0"."""
    from hilq.bench.report.model import fmt_p

    assert [fmt_p(p) for p in (0.0, 3.2e-5, 0.5, None)] == ["<1e-16", "3.2e-05", "0.5", "–"]
