"""`hilq devices gpu` judges each GPU path's measurement (bench/gpu_check.py): the run is ok,
device time is plausible against host time, NVML energy has its baseline, integer variants ran
integer kernels. The judging is checked on measurement records here; the GPU run itself only
on a machine with CUDA (scripts/gpu_check.sh on a lent one), and without CUDA the command
says so in one line."""

from __future__ import annotations

import pytest
from hilq.bench.cli import main
from hilq.bench.gpu_check import check, rows


def _m(variant="w8a8", host=2.0, dev=1.9, energy=0.01, idle=55.0, kernels=None, **kw):
    return {"model": "resnet50", "variant": variant, "status": "ok", "latency_ms": {"p50": host},
            "device_latency_ms": {"p50": dev} if dev is not None else None,
            "energy_j_per_inference": energy, "power": {"idle_w": idle},
            "kernels": kernels if kernels is not None else {"integer": ["fc"], "float": []}, **kw}


def test_a_sound_gpu_path_passes():
    assert check(_m()) == [] and check(_m("fp16", kernels={})) == []


@pytest.mark.parametrize("m, says", [
    (_m(status="failed", failure="runtime_error", reason="CUDA OOM"), "runtime_error: CUDA OOM"),
    (_m(dev=None), "no CUDA-event device time"),
    (_m(dev=2.5), "outside [0.5, 1.05]"),            # device time past wall time
    (_m(dev=0.5), "outside [0.5, 1.05]"),            # the timer missed work
    (_m(energy=None), "no NVML energy"),
    (_m(idle=None), "idle baseline"),
    (_m(kernels={"integer": [], "float": ["fc"]}), "no layer ran _int_mm"),
    (_m("w4a16", kernels={"integer": ["a"], "float": ["b", "c"]}), "2 layer(s) stayed float"),
])
def test_each_broken_property_is_named(m, says):
    assert any(says in p for p in check(m)), check(m)


def test_speed_is_against_fp16_of_the_same_run():
    got = rows([_m("fp16", host=4.0, kernels={}), _m("w8a8", host=2.0)])
    assert [r.x_fp16 for r in got] == [1.0, 2.0] and got[1].mj_per_inference == 10.0


def test_without_cuda_it_is_one_line_exit_2(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: scripts/gpu_check.sh runs the real check")
    assert main(["devices", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hilq devices: error: no CUDA device visible to PyTorch here: nothing to check"]
