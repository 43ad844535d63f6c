"""Red lines about accuracy carry their evidence: device and simulation (or two nights)
paired sample by sample, an exact McNemar test on the samples they disagree on
(bench.evidence). One flip in 16 samples is no red line; 8 in 450 is, with its p-value."""

import pytest
from hilq.bench.evidence import paired
from hilq.bench.report import render
from hilq.bench.runner import with_simulated
from hilq.bench.store import open_store

from hilq.accuracy import bits
from hilq.measurement import Measurement


def _hits(n: int, flips: int) -> str:
    return bits([True] * (n - flips) + [False] * flips)


def test_one_flip_in_sixteen_cannot_tell_eight_in_450_can():
    small = paired(_hits(16, 1), _hits(16, 0))
    assert not small.decidable and not small.significant and small.p == 1.0
    assert "not enough samples to tell" in small.says()
    big = paired(_hits(450, 8), _hits(450, 0))
    assert big.significant and big.p == pytest.approx(2 * 0.5 ** 8)
    assert (big.only_first, big.only_second) == (0, 8)
    assert "p = 0.0078" in big.says()
    # pairing, not counting: 8 flips each way is no difference at all
    both = paired("1" * 8 + "0" * 8 + "1" * 434, "0" * 8 + "1" * 8 + "1" * 434)
    assert both.decidable and not both.significant and both.p == 1.0
    assert paired(_hits(16, 1), _hits(15, 0)) is None     # not the same samples


def _report(tmp_path, n: int, flips: int) -> str:
    device = {"n": n, "top1": (n - flips) / n, "per_sample": {"top1": _hits(n, flips)}}
    manifest = {"simulated": {"n": n, "top1": 1.0, "per_sample": {"top1": _hits(n, 0)}}}
    store = open_store(tmp_path / f"{n}.sqlite")
    run = store.begin_run({"test": n}, seed=0)
    store.add_measurement(run, Measurement(
        "m", "w8a8", "local", "ort", latency_ms={"p50": 1.0, "p90": 1.1, "p99": 1.2,
                                                 "mean": 1.0, "std": 0.1},
        samples_ms=[1.0] * 20, accuracy=with_simulated(device, manifest)), round=0)
    store.finish_run(run, "ok")
    rep = render(store, run, tmp_path / f"r{n}")
    store.close()
    return rep.markdown.read_text()


def test_report_red_line_only_with_evidence(tmp_path):
    md = _report(tmp_path, 16, 1)           # 6.25 pt on 16 samples: one flip
    assert "Device accuracy differs from the simulation" not in md
    assert "not enough samples to tell: 1 of 16 differ" in md
    md = _report(tmp_path, 450, 8)          # 1.8 pt on 450 samples: 8 flips, one way
    assert "Device accuracy differs from the simulation" in md
    assert "8 only in the simulation: exact McNemar p = 0.0078" in md


def _nights(tmp_path, n: int, flips: int) -> list[dict]:
    """Two nights of one variant on one evaluation set; tonight `flips` samples that were
    right last night are wrong."""
    from hilq.bench import regress

    store = open_store(tmp_path / f"nights-{n}.sqlite")
    for night, lost in enumerate((0, flips)):
        run = store.begin_run({"night": night, "n": n}, seed=night)
        acc = {"n": n, "top1": (n - lost) / n, "eval_sha256": "e" * 64,
               "per_sample": {"top1": _hits(n, lost)}}
        store.add_measurement(run, Measurement(
            "m", "w8a8", "local", "ort", latency_ms={"p50": 1.0, "p90": 1.1, "p99": 1.2,
                                                     "mean": 1.0, "std": 0.1},
            samples_ms=[1.0] * 20, accuracy=acc), round=0)
        store.finish_run(run, "ok")
    rows = [r for r in regress.detect(store, run) if r["metric"] == "top1"]
    store.close()
    return rows


def test_accuracy_regression_needs_the_paired_test(tmp_path):
    (v,) = _nights(tmp_path, 16, 1)         # 6.25 pt, over the threshold, one sample
    assert not v["flagged"] and "not enough samples to tell" in v["note"]
    (v,) = _nights(tmp_path, 450, 8)
    assert v["flagged"] and v["p_value"] == pytest.approx(2 * 0.5 ** 8)
    assert "exact McNemar p = 0.0078" in v["note"] and v["method"] == "points, exact McNemar"
