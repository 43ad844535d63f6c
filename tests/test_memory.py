"""Memory figures: the tracker's phases on the real /proc of this process, then the agent's
figures for real artifacts, stored (schema v4 columns) and reported beside the file size."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import quick_protocol
from hilq.bench.report import render
from hilq.bench.runner import bench_variants
from hilq.bench.store import open_store
from hilq.devices import memory
from hilq.devices.local import LocalDevice
from hilq.quant.export import build_artifact

QUICK = quick_protocol()
LINUX = os.path.exists(memory.STATUS)

# in a fresh process: the tracker's figures must not depend on what this test process did
PHASES = """
import json, sys
import numpy as np
from hilq.devices import memory
t = memory.Tracker()
big = np.ones(200 * 2**20 // 8)       # 200 MiB, touched, then freed
del big
t.mark("load")
small = np.ones(50 * 2**20 // 8)      # 50 MiB, alive at the end of its phase
t.mark("timed")
print(json.dumps(t.figures()))
"""


@pytest.mark.skipif(not LINUX, reason="/proc/self/status is Linux's")
def test_each_phase_has_its_own_peak():
    import json

    out = subprocess.run([sys.executable, "-c", PHASES], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout
    f = json.loads(out)
    assert f["source"] == "proc" and f["separable"]
    assert f["load_peak_mb"] - f["rss_start_mb"] >= 195            # the 200 MiB array
    assert f["load_delta_mb"] < 20                                  # ... was freed
    assert 45 <= f["timed_peak_mb"] - f["load_rss_mb"] < 60         # reset between phases:
    assert f["timed_peak_mb"] < f["load_peak_mb"] - 100             # the 50 MiB, not the 200


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    out = tmp_path_factory.mktemp("mem")
    return [build_artifact("digits-cnn", v, out) for v in ("fp32", "w8a8")]


def test_agent_reports_memory_beside_the_artifact_size(arts, tmp_path):
    store = open_store(tmp_path / "s.sqlite")
    run_id = store.begin_run({"t": 1})
    ms = bench_variants("digits-cnn", arts, LocalDevice(workdir=str(tmp_path / "w")), "ort",
                        QUICK, rounds=2, store=store, run_id=run_id)
    for m, a in zip(ms, arts):
        mem = m.memory
        assert m.status == "ok" and mem["artifact_mb"] == pytest.approx(
            os.path.getsize(a.path) / 2**20, abs=1e-3)
        if LINUX:
            assert mem["separable"] and mem["rss_start_mb"] > 0
            assert mem["load_peak_mb"] >= mem["load_rss_mb"] >= mem["rss_start_mb"] - 1
            assert mem["load_peak_mb"] > mem["rss_start_mb"]     # ORT and the model arrived
            assert 0 < mem["timed_peak_mb"]
    rows = store.measurements(run_id)
    assert len(rows) == 4 and all(r["timed_peak_mb"] and r["load_peak_mb"] for r in rows)
    assert all(r["extra"]["memory"]["artifact_mb"] > 0 for r in rows)
    rep = render(store, run_id, tmp_path / "rep")
    assert rep.sections["Memory"]
    text = rep.markdown.read_text()
    assert "timed peak" in text and "artifact MiB" in text
