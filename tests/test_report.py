"""Reports from a store holding a realistic synthetic history: every section present, plots
embedded, nothing external; and, where Chromium is installed, a screenshot that shows them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import require
from hilq.bench import regress, report
from hilq.bench.store import open_store

from hilq.measurement import Measurement

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"fp32": (20.0, 0.712), "w8a8": (9.0, 0.705), "w4a8": (7.5, 0.664)}
FACTS = {"os": "Linux 6.1", "cpu": "Synthetic Xeon", "cores": 2,
         "flags": ["avx2", "avx512f", "avx512_vnni"], "onnxruntime": "1.32.0"}
LAYERS = [f"layer{i}.conv" for i in range(8)]


def spec(bits):
    return None if bits is None else {"bits": bits, "symmetric": True, "granularity": "channel"}


def _device_accuracy(v: str) -> dict:
    """w4a8 on the engine 1.2 pt under its simulation, 12 of 1000 samples right only in
    the simulation: the gap the report must show, with its evidence."""
    from hilq.bench.evidence import paired

    sim = VARIANTS[v][1]
    dev = sim - (0.012 if v == "w4a8" else 0.0)
    flips = 12 if v == "w4a8" else 0
    test = paired("1" * (1000 - flips) + "0" * flips, "1" * 1000).to_dict()
    return {"n": 1000, "top1": dev, "agreement_fp32": 0.99, "kl": 0.01, "sqnr_db": 30.0,
            "worst": [3, 7], "eval_sha256": "e" * 64, "simulated_top1": sim,
            "simulated_agreement_fp32": 0.99, "gap_top1": dev - sim, "paired_top1": test}


def _scenario(v: str, lat: dict) -> dict:
    """LoadGen's SingleStream verdict; w4a8's Server run INVALID (the report must say so)."""
    if v == "w4a8":
        return {"scenario": "server", "valid": False, "result": "INVALID", "metric":
                "p99_latency_ms", "unit": "ms", "value": 40.0,
                "reasons": ["latency bound missed at the target QPS"], "latency_ms": {}}
    return {"scenario": "single-stream", "valid": True, "result": "VALID", "metric":
            "p90_latency_ms", "unit": "ms", "value": lat["p90"], "reasons": [],
            "latency_ms": {"p50": lat["p50"], "p90": lat["p90"]}, "query_count": 500}


def synthetic_store(path, nights=6, slow_last=1.15):
    """A week of nightly runs of three variants in two alternating rounds; the last night
    w8a8 is 15% slower; the last run also has a search (cost table and two allocations)."""
    store = open_store(path)
    rng = np.random.default_rng(0)
    run = None
    for n in range(nights):
        run = store.begin_run({"nightly": n}, seed=n)
        for r in range(2):
            for v, (median, _) in VARIANTS.items():
                f = slow_last if (n == nights - 1 and v == "w8a8") else 1.0
                s = median * f * rng.lognormal(0, 0.02) * rng.lognormal(0, 0.05, 120)
                lat = {"p50": float(np.median(s)), "p90": float(np.percentile(s, 90)),
                       "p99": float(np.percentile(s, 99)), "mean": float(s.mean()),
                       "std": float(s.std())}
                store.add_measurement(run, Measurement(
                    "resnet18", v, "local", "onnxruntime", latency_ms=lat,
                    samples_ms=s.round(4).tolist(), throughput=1000 / lat["mean"],
                    energy_j_per_inference=0.0015 * lat["mean"],
                    power={"avg_w": 1.5, "meter": "rapl"}, facts=FACTS,
                    status="degraded" if v == "w4a8" else "ok",
                    reason="2 layers ran in float" if v == "w4a8" else None,
                    accuracy=_device_accuracy(v) if r == 0 else {},
                    memory={"artifact_mb": 44.7 if v == "fp32" else 11.3, "rss_start_mb": 60.0,
                            "load_peak_mb": 180.0, "load_rss_mb": 170.0,
                            "load_delta_mb": 110.0, "timed_peak_mb": 175.0},
                    scenario=_scenario(v, lat) if r == 0 else {}), round=r)
        if n == nights - 1:       # a batch sweep: fp32 and w8a8 at batch 8 beside batch 1
            for v in ("fp32", "w8a8"):
                s = 5 * VARIANTS[v][0] * rng.lognormal(0, 0.05, 60)
                store.add_measurement(run, Measurement(
                    "resnet18", f"{v}@b8", "local", "onnxruntime", samples_ms=s.tolist(),
                    latency_ms={"p50": float(np.median(s))}, throughput=8000 / float(s.mean()),
                    protocol={"batch": 8}, facts=FACTS))
            for length in (16, 32):    # and a sequence-length sweep of one transformer
                s = length / 8 * rng.lognormal(0, 0.05, 60)
                store.add_measurement(run, Measurement(
                    "tiny-transformer", f"fp32@s{length}", "local", "onnxruntime",
                    samples_ms=s.tolist(), latency_ms={"p50": float(np.median(s))},
                    throughput=1000 / float(s.mean()), protocol={"batch": 1, "seq_len": length},
                    facts=FACTS))
        for v, (_, top1) in VARIANTS.items():
            store.add_accuracy(run, "resnet18", v, top1, 1000, "imagenette")
        store.finish_run(run)
        regress.detect(store, run)
    store.add_cost_rows(run, [dict(model="resnet18", device="local", runtime="onnxruntime",
                                   layer=layer, precision=p, latency_ms=0.3, method="measured")
                              for layer in LAYERS for p in ("w8a8", "w4a8")])
    for name, lat_budget, meas, top1, bits in (("lat<=8ms", 8.0, 8.3, 0.69, 4),
                                               ("lat<=9ms", 9.0, 8.7, 0.70, 8)):
        config = {layer: {"weight": spec(bits if i % 3 else 8), "act": spec(8)}
                  for i, layer in enumerate(LAYERS)}
        config[LAYERS[0]] = {"weight": None, "act": None}
        store.add_allocation(run, "resnet18", "local", "onnxruntime", name,
                             budgets={"latency_ms": lat_budget}, config=config,
                             predicted={"latency_ms": lat_budget - 0.2, "size_bits": 4e6},
                             measured={"latency_ms": meas}, accuracy=top1,
                             variant=f"config:{name}.json")
    store.mark_intended(run, "resnet18", "fp32", "local", "onnxruntime", reason="test")
    return store, run


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    store, run = synthetic_store(tmp / "hilq.sqlite")
    rep = report.render(store, "latest", tmp / "out")
    yield store, run, rep
    store.close()


def test_render_writes_markdown_and_self_contained_html(rendered):
    store, run, rep = rendered
    assert rep.run_id == run and rep.markdown.is_file() and rep.html.is_file()
    debug = "Per-layer error of the searched configuration"     # its own test, below
    assert all(v for k, v in rep.sections.items() if k != debug), rep.sections
    assert rep.flagged == 2          # w8a8 p50 and its energy
    page = rep.html.read_text()
    for title in report.SECTIONS:          # every section that ran is on the page, no other
        assert (f"<h2>{title}</h2>" in page) == (title != debug)
        assert (f"## {title}" in rep.markdown.read_text()) == (title != debug)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == rep.plots >= 7
    assert all(len(i) > 5000 for i in images)
    # self-contained: no scripts, stylesheets, or anything fetched from elsewhere
    assert not re.search(r"<script|<link|src=\"(?!data:)|url\(", page)
    md = rep.markdown.read_text()
    for name in re.findall(r"\]\((plots/[^)]+)\)", md):
        assert (rep.dir / name).stat().st_size > 1000
    assert "REGRESSION" in page and "degraded: 2 layers ran in float" in page
    assert "avx512_vnni" in page and "lat&lt;=8ms" in page
    assert "Device accuracy differs from the simulation (paired" in md
    assert ("resnet18 w4a8 on local/onnxruntime: top1 -1.20 pt (0 of 1000 samples right only "
            "on the device, 12 only in the simulation: exact McNemar p = 0.00049)") in md
    sweep = md.split("## Batch sweep")[1].split("\n## ")[0]       # batch 1 and 8, w8a8 × fp32
    assert "| resnet18 | w8a8 | local/onnxruntime | 8 | 44.9 | 5.61 | 178.0 | 2.22× |" in sweep
    assert "| resnet18 | fp32 | local/onnxruntime | 1 |" in sweep and "batch_sweep.png" in sweep
    seq = md.split("## Sequence-length sweep")[1].split("\n## ")[0]     # tokens/s = seqs/s × L
    assert "| tiny-transformer | fp32 | local/onnxruntime | 32 |" in seq and "tokens/s" in seq
    assert "seq_len_sweep.png" in seq and "| resnet18 |" not in seq
    trends = md.split("## Nightly trends")[1].split("\n## ")[0]  # p50, then the accuracy gap
    assert "trends.png" in trends and "accuracy_trends.png" in trends
    assert "simulated (fake-quant) top-1 of tonight's artifact" in trends


def _section(md: str, title: str) -> str:
    return md.split(f"## {title}\n")[1].split("\n## ")[0]


def test_the_invalid_scenario_and_the_memory_figures_are_in_the_markdown(rendered):
    """w4a8's LoadGen Server run is INVALID: the summary and the scenarios section say so
    with LoadGen's reason; the memory table has each variant's own figures, in their columns."""
    md = rendered[2].markdown.read_text()
    why = "latency bound missed at the target QPS"
    assert (f"Needs attention: resnet18 w4a8 on local/onnxruntime: LoadGen server INVALID "
            f"({why})") in _section(md, "Summary")
    scenarios = _section(md, "MLPerf scenarios (LoadGen)")
    assert f"**⚠ INVALID: resnet18 w4a8 on local/onnxruntime, server: {why}**" in scenarios
    assert ("| resnet18 | w4a8 | local/onnxruntime | server | INVALID | p99_latency_ms | 40 ms |"
            in scenarios)
    for v in ("fp32", "w8a8"):
        assert f"| resnet18 | {v} | local/onnxruntime | single-stream | VALID |" in scenarios
    memory = _section(md, "Memory")      # artifact MiB, load peak, timed peak, loading added
    for v, artifact_mb in (("fp32", "44.7"), ("w8a8", "11.3"), ("w4a8", "11.3")):
        assert f"| resnet18 | {v} | local | onnxruntime | {artifact_mb} | 180 | 175 | 110 |" \
            in memory


def test_sections_that_did_not_run_are_left_out(tmp_path):
    """A run of one failed measurement: the summary says what needs attention; no empty
    heading for energy, searches or history (`Report.sections` still names them, False)."""
    store = open_store(tmp_path / "hilq.sqlite")
    run = store.begin_run({"bare": True})
    store.add_measurement(run, Measurement.failed("m", "fp32", "pi", "onnxruntime",
                                                  "unreachable", "no route to host"))
    rep = report.render(store, run, tmp_path / "out")
    page, md = rep.html.read_text(), rep.markdown.read_text()
    assert set(rep.sections) == set(report.SECTIONS)
    assert not rep.sections["Energy per inference"] and not rep.sections["Bit allocation"]
    for title in ("Energy per inference", "Bit allocation", "Nightly trends", "Batch sweep"):
        assert f"## {title}" not in md and f"<h2>{title}</h2>" not in page
    assert "No energy measured" not in page and "No searched configs" not in page
    assert "Needs attention: m fp32 on pi/onnxruntime: failed: unreachable" in md
    store.close()


def test_pareto_front():
    pts = [(10, 0.70), (8, 0.69), (12, 0.71), (9, 0.60), (11, 0.69)]
    assert report.pareto_front(pts) == [(8, 0.69), (10, 0.70), (12, 0.71)]


def test_chromium_screenshot_shows_plots(rendered, tmp_path):
    from hilq.bench import screenshot as shot

    if not shot.find_chromium():      # .ci/run installs it and sets HILQ_REQUIRE=chromium
        require("chromium", f"no Chromium on PATH (none of {', '.join(shot.BROWSERS)}; "
                "apt-get install -y chromium); hilq report --screenshot PNG does the same")
    _, _, rep = rendered
    png = shot.screenshot(rep.html, tmp_path / "shot.png", width=1280, height=4000)
    from matplotlib.image import imread

    img = imread(png)[..., :3]
    assert img.shape[:2] == (4000, 1280)
    # plots draw in matplotlib's saturated colours; text and tables are grey on white
    saturation = img.max(axis=2) - img.min(axis=2)
    assert (saturation > 0.3).mean() > 0.002


def test_cli_report(rendered, tmp_path, capsys):
    import json

    from hilq.bench.cli import main

    store, run, _ = rendered
    out = tmp_path / "cli"
    assert main(["report", "--db", store.url, "--run", run, "--out", str(out),
                 "--json", str(tmp_path / "r.json")]) == 0
    assert (out / "report.html").is_file() and "report for run" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["regressions_flagged"] == 2
    assert main(["report", "--db", store.url, "--run", "no-such-run"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err


def test_a_search_that_missed_its_budget_is_the_first_thing_in_red(tmp_path):
    store, run = synthetic_store(tmp_path / "m.sqlite", nights=1)
    cfg = {layer: {"weight": spec(8), "act": spec(8)} for layer in LAYERS}
    for i, (meas, within) in enumerate(((26.3, False), (19.9, False)), 1):
        store.add_allocation(run, "resnet18", "local", "onnxruntime", f"iteration-{i}",
                             budgets={"latency_ms": 18.8}, config=cfg,
                             predicted={"latency_ms": 18.6, "latency_sd_ms": 0.4,
                                        "margin_ms": 0.7},
                             measured={"latency_ms": meas, "latency_ci_ms": 0.5,
                                       "latency_error": 18.6 / meas - 1,
                                       "within_budget": within})
    store.add_allocation(run, "resnet18", "local", "onnxruntime", "chosen",
                         budgets={"latency_ms": 18.8}, config=cfg,
                         predicted={"latency_ms": 18.6, "latency_sd_ms": 0.4},
                         measured={"latency_ms": 19.9, "latency_ci_ms": 0.5,
                                   "search_status": "budget_missed", "iterations": 2,
                                   "message": "budget 18.8 ms missed after 2 iteration(s)"})
    rep = report.render(store, out_dir=tmp_path / "r")
    store.close()
    page = rep.html.read_text()
    body = page[page.index("<body>"):]
    alert = body.index('class="alert"')
    assert alert < body.index("<table")                    # before any table
    assert "BUDGET_MISSED: budget 18.8 ms, pick measured 19.9" in page
    # the iterations follow, the misses marked
    assert body.count("<td class=bad>MISSED</td>") == 2
    assert "> **⚠ search resnet18 on local/onnxruntime: BUDGET_MISSED" in rep.markdown.read_text()


def test_report_shows_the_per_layer_debug_of_the_searched_configuration(tmp_path):
    """The nightly keeps `hilq debug` of its pick with the chosen allocation; the report
    draws it (table worst first and the plot)."""
    from hilq.bench import cli

    out = tmp_path / "d.json"
    assert cli.main(["debug", "--model", "digits-cnn", "--variant", "w8a8", "--samples", "16",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    store = open_store(tmp_path / "s.sqlite")
    run = store.begin_run({"x": 1})
    store.add_allocation(run, "digits-cnn", "local", "ort", "chosen",
                         budgets={"latency_ms": 1.0}, config={}, predicted={"latency_ms": 1.0},
                         measured={"latency_ms": 1.0, "debug": result})
    store.finish_run(run)
    rep = report.render(store, run, tmp_path / "out")
    assert rep.sections["Per-layer error of the searched configuration"]
    md = rep.markdown.read_text()
    worst = result["layers"][0]["layer"]
    sec = md.split("## Per-layer error of the searched configuration")[1]
    assert f"| 1 | {worst} |" in sec and "own dB" in sec and "plots/debug-digits-cnn" in sec


def test_latency_spanning_decades_is_drawn_on_a_log_axis():
    """A 0.05 ms model whose few outliers reach 4.5 ms: its box must not be squeezed into a
    pixel by a linear axis; one that spans less than a decade stays linear."""
    from types import SimpleNamespace

    from hilq.bench.report import plots

    rng = np.random.default_rng(0)
    fast = np.r_[rng.normal(0.05, 0.002, 500), [4.5, 3.0]]
    steady = rng.normal(20.0, 0.5, 500)
    rows = [SimpleNamespace(model="digits", variant="w8a8", device="d", runtime="ort",
                            samples=fast),
            SimpleNamespace(model="resnet", variant="fp32", device="d", runtime="ort",
                            samples=steady)]
    fig = plots.distribution(rows)
    digits, resnet = fig.axes
    assert digits.get_xscale() == "log" and resnet.get_xscale() == "linear"
