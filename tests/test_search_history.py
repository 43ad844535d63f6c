"""search.history: earlier nights' timings from a real results store, each batch on its
night's scale and each night on the newest night's."""

import pytest
from hilq.bench import search
from hilq.bench.latmodel import FLOAT, INT8
from hilq.bench.store import open_store

from hilq.measurement import Measurement, Protocol

LAYERS = ["a", "b"]
INT8_SPEC = {"weight": {"bits": 8}, "act": {"bits": 8}}
CONFIGS = {INT8: {"a": INT8_SPEC, "b": INT8_SPEC}, FLOAT: {}, "mix": {"b": INT8_SPEC}}


def _night(store, readings: dict[str, tuple[str, list[float]]]) -> str:
    """One night's search timings: variant -> (config name, p50 per round)."""
    run = store.begin_run({"command": "search", "night": sorted(readings)[0]}, resume=False)
    for variant, (cfg, p50s) in readings.items():
        for k, p50 in enumerate(p50s):
            m = Measurement("toy", variant, "local", "ort", latency_ms={"p50": p50, "n": 10},
                            protocol={"batch": 1, "threads": 0})
            store.add_measurement(run, m, kind="search", round=k, bit_config=CONFIGS[cfg])
    store.finish_run(run, "ok")
    return run


def test_each_batch_is_scaled_by_its_uniforms_and_each_night_by_the_newest(tmp_path):
    store = open_store(tmp_path / "h.sqlite")
    # night 1: the patterns, then a pick measured while the machine ran 10% slower
    _night(store, {"uniform-w8a8": (INT8, [2.0, 2.0]), "uniform-fp32": (FLOAT, [4.0, 4.0]),
                   "it1-uniform-w8a8": (INT8, [2.2, 2.2]), "it1-uniform-fp32": (FLOAT, [4.4, 4.4]),
                   "it1-pick": ("mix", [3.3, 3.3])})
    # night 2: the same machine, twice as fast
    _night(store, {"uniform-w8a8": (INT8, [1.0, 1.0]), "uniform-fp32": (FLOAT, [2.0, 2.0])})
    obs = search.history(store, "toy", "local", "ort", LAYERS, Protocol(), exclude_run=None)
    mixes = [o for o in obs if o.config == {"a": FLOAT, "b": INT8}]
    assert len(mixes) == 1
    assert mixes[0].latency_ms == pytest.approx(3.3 / 1.1 / 2.0)
    int8 = [o.latency_ms for o in obs if o.config == dict.fromkeys(LAYERS, INT8)]
    assert int8 and all(v == pytest.approx(1.0) for v in int8)
