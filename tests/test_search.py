"""The search's pieces that need no device: the float edges between layers."""

from __future__ import annotations

import json

import pytest
import torch
from hilq.bench import search
from torch import nn


def test_float_edges_follow_tensors_through_relu_pool_and_residual_adds():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.a(x))
            z = self.c(torch.relu(self.b(y))) + y          # residual: a feeds c's add too
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))

    edges = set(search.float_edges(Net(), ["a", "b", "c", "fc"]))
    assert {("a", "b"), ("b", "c"), ("c", "fc")} <= edges
    assert ("a", "fc") in edges                          # through the residual add
    assert ("b", "fc") not in edges                      # b reaches fc only through c


def _search(tmp_path, *extra):
    from hilq.bench.cli import main

    out = tmp_path / f"out{len(list(tmp_path.glob('out*.json')))}.json"
    # --tolerance 0.25: a 0.07 ms model's CI never narrows to 5% on a noisy VM, and the loop's
    # statistics are tests/test_loop.py's; these tests are about the real engine's plumbing
    rc = main(["search", "--model", "digits-cnn", "--calib-data", "real", "--min-duration-s",
               "0.3", "--rounds", "2", "--tolerance", "0.25", "--db", str(tmp_path / "s.sqlite"),
               "--work-dir",
               str(tmp_path / "work"), "--json", str(out), *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.load
@pytest.mark.slow
def test_search_on_the_local_cpu_closes_the_loop_and_stores_every_iteration(tmp_path):
    import sqlite3

    rc, res = _search(tmp_path, "--budget", "latency_ms=50%")
    # digits-cnn runs in 13 µs: FP32 and INT8 differ by 10%, and on a noisy VM a batch can
    # read 20–40% slow. The search must then say so with exit 4 (the machine slowed, the noise
    # bounds the check, or after a missed pick no configuration is predicted under the budget
    # with confidence; the loop's statistics are tests/test_loop.py's, and the search that
    # must meet its budget is ResNet-18's below); whichever way, every iteration is stored
    assert (rc, res["status"]) == (0, "ok") or (rc, res["status"]) == (4, "budget_missed") and (
        any(why in res["message"] for why in ("slower during the search", "noise",
                                              "predicted under"))), res["message"]
    assert res["prior"] == "profile"                       # ORT's node profile was read
    budget = res["resolved_budgets"]["latency_ms"]
    assert budget >= res["baseline"]["fastest"]["latency_ms"]   # between the measured uniforms
    assert len(res["loo"]) >= 4
    if rc == 0:
        assert res["iterations"] and res["measured"]["within_budget"]
        assert res["measured"]["latency_ms"] <= budget + res["measured"]["latency_ci_ms"]
        assert res["predicted"]["latency_ms"] + res["predicted"]["latency_sd_ms"] > 0
    db = sqlite3.connect(tmp_path / "s.sqlite")
    kinds = dict(db.execute("select kind, count(*) from measurements group by kind").fetchall())
    assert kinds["profile"] == 4                           # the four patterns, profiled once
    names = {r[0] for r in db.execute("select name from allocations")}
    assert {"chosen" if rc == 0 else "iteration-1", "iteration-1"} <= names
    # a second search takes the first one's measurements into its fit
    # (on a noisy VM it may honestly miss a 0.03 ms budget: then it must say so, exit 4; or,
    # when the first search's picks read 50% slow, find no configuration under the budget
    # with 95% confidence: exit 2, and the fit still grew)
    rc, again = _search(tmp_path, "--budget", "latency_ms=50%")
    assert (rc, again["status"]) in {(0, "ok"), (4, "budget_missed")} or (
        (rc, again["status"]) == (2, "infeasible") and "confidence" in again["message"]), \
        again["message"]
    assert again["measured"].get("within_budget", False) == (rc == 0)
    assert again["latency_model"]["observations"] > res["latency_model"]["observations"]
    # the stored searches replay offline (bench.replay, hilq search --replay): the first
    # pick's prediction is rebuilt from the store alone, to the digit
    from hilq.bench import replay
    from hilq.bench.store import open_store
    from hilq.quant.models import load_model
    from hilq.quant.transform import fold_bn, quantizable_layers

    folded = fold_bn(load_model("digits-cnn").build().eval())
    layers = quantizable_layers(folded)
    runs = replay.nights(open_store(tmp_path / "s.sqlite"), "digits-cnn", "local", "ort", layers)
    assert len(runs) == 2
    first = replay.replay(layers, search.float_edges(folded, layers), runs, scaled=True)[0]
    stored = json.loads(db.execute("select predicted from allocations where name = "
                                   "'iteration-1' order by id").fetchone()[0])
    assert first["batch"] == "1" and first["name"] == "pick"
    assert first["predicted_ms"] == pytest.approx(stored["latency_ms"], rel=1e-9)


@pytest.mark.slow
def test_budget_below_anything_measured_is_refused_in_one_line(tmp_path, capsys):
    rc, res = _search(tmp_path, "--budget", "latency_ms=0.0001", "--quiet")   # no chatter
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and res["status"] == "infeasible"
    assert len(err) == 1 and "budget refused" in err[0] and "below the fastest measured" in err[0]


@pytest.mark.slow
def test_accuracy_limited_search_finds_a_pick_within_the_drop(tmp_path):
    rc, res = _search(tmp_path, "--max-drop", "top1=0.5")
    assert rc == 0, res["message"]
    drop = 100 * (res["accuracy"]["fp32_top1"] - res["accuracy"]["top1"])
    assert drop <= 0.5 + 1e-9
    assert res["accuracy_checks"] and res["measured"]["accuracy_within_limit"]


@pytest.mark.parametrize("flags, says", [
    (["--max-drop", "top5=1"], "use top1=POINTS"),
    (["--budget", "latency_ms=50%", "--max-drop", "top1=1"], "one of them"),
    ([], "one of them"),
    (["--budget", "energy_mj=3"], "expected COLUMN=VALUE"),
    (["--min-agreement", "1.5"], "fraction"),
])
def test_bad_search_flags_are_one_line(tmp_path, capsys, flags, says):
    rc, _ = _search(tmp_path, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says in err[0]


@pytest.mark.load
@pytest.mark.slow
def test_a_real_engine_search_on_resnet18_meets_its_budget(tmp_path):
    """ResNet-18 on ONNX Runtime here (INT8 well apart from FP32, milliseconds per run, so
    the loop can resolve a 50% budget): the search must end ok, its pick measured within the
    budget. What is retried is the measurement (the loop re-measures a noisy pick), never
    this assertion. Run alone (tox -e load)."""
    from hilq.bench.cli import main

    out = tmp_path / "search.json"
    rc = main(["search", "--model", "resnet18", "--calib-data", "distilled", "--samples", "8",
               "--distill-iters", "25", "--budget", "latency_ms=50%", "--rounds", "2",
               "--min-duration-s", "1.0", "--threads", "1", "--db", str(tmp_path / "s.sqlite"),
               "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    res = json.loads(out.read_text())
    assert (rc, res["status"]) == (0, "ok"), res["message"]
    budget = res["resolved_budgets"]["latency_ms"]
    assert res["measured"]["within_budget"]
    assert res["measured"]["latency_ms"] <= budget + res["measured"]["latency_ci_ms"]
    # the budget lies between the measured uniforms: a real trade-off, not all-INT8 for free
    fastest = res["baseline"]["fastest"]
    assert fastest["variant"] == "w8a8" and fastest["latency_ms"] < budget
