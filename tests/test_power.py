"""devices/power.py: RAPL on a sysfs-shaped tree (with wraparound), tegrastats on real
lines, the external-command meter end to end with a real subprocess, integration over the
timing window, and NVML when a GPU is present."""

import sys
import time

import pytest
from hilq.devices import power

ORIN_NANO = ("11-23-2026 10:15:32 RAM 2317/7620MB (lfb 1034x4MB) SWAP 0/3810MB (cached 0MB) "
             "CPU [2%@1510,1%@1510,0%@1510,0%@1510,0%@729,0%@729] GR3D_FREQ 0% cpu@47.5C "
             "soc2@46.2C soc0@46.9C gpu@47.4C tj@47.5C soc1@46.5C VDD_IN 4787mW/4790mW "
             "VDD_CPU_GPU_CV 517mW/520mW VDD_SOC 1432mW/1432mW")
AGX_ORIN = ("08-11-2023 10:15:32 RAM 2458/30536MB (lfb 6452x4MB) SWAP 0/15268MB (cached 0MB) "
            "CPU [1%@729,0%@729,0%@729,0%@729,off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ "
            "0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C CPU@46.968C Tboard@34C SOC2@43.562C "
            "VDD_GPU_SOC 3176mW/3176mW VDD_CPU_CV 795mW/795mW VIN_SYS_5V0 3836mW/3836mW "
            "VDDQ_VDD2_1V8AO 302mW/302mW")
NANO_JP4 = ("RAM 1853/3956MB (lfb 106x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
            "CPU [11%@1479,5%@1479,3%@1479,2%@1479] EMC_FREQ 3%@1600 GR3D_FREQ 0%@921 APE 25 "
            "PLL@27C CPU@30C PMIC@100C GPU@28.5C AO@37.5C thermal@29C POM_5V_IN 2450/2450 "
            "POM_5V_GPU 0/0 POM_5V_CPU 409/409")


def test_tegrastats_lines():
    assert power.parse_tegrastats(ORIN_NANO) == pytest.approx(4.787)
    assert power.parse_tegrastats(ORIN_NANO, "VDD_SOC") == pytest.approx(1.432)
    assert power.parse_tegrastats(NANO_JP4) == pytest.approx(2.450)
    # AGX Orin has no board-input rail: the sum of its rails (RAM/SWAP are not rails)
    assert power.parse_tegrastats(AGX_ORIN) == pytest.approx(3.176 + 0.795 + 3.836 + 0.302)
    assert power.parse_tegrastats("RAM 2458/30536MB SWAP 0/15268MB") is None
    assert power.parse_tegrastats(ORIN_NANO, "VDD_NOPE") is None


def _zone(root, k, energy, max_range):
    z = root / f"intel-rapl:{k}"
    z.mkdir(parents=True)
    (z / "name").write_text(f"package-{k}\n")
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{max_range}\n")
    sub = root / f"intel-rapl:{k}:0"  # a subzone (core): not counted twice
    sub.mkdir()
    (sub / "energy_uj").write_text("0\n")
    (sub / "max_energy_range_uj").write_text(f"{max_range}\n")
    return z


def test_rapl_deltas_and_wraparound(tmp_path):
    z0 = _zone(tmp_path, 0, 262_000_000_000, 262_143_328_850)
    z1 = _zone(tmp_path, 1, 5_000_000, 262_143_328_850)
    read, close = power.rapl(str(tmp_path))
    assert read() == (None, 0.0)
    (z0 / "energy_uj").write_text("262_100_000_000\n".replace("_", ""))  # +100 J
    (z1 / "energy_uj").write_text("7000000\n")                           # +2 J
    assert read()[1] == pytest.approx(102.0)
    (z0 / "energy_uj").write_text("43328850\n")  # wrapped: +(262143328850-262100000000)+43328850
    assert read()[1] == pytest.approx(102.0 + 43.32885 + 43.32885)
    close()


def test_rapl_missing_or_unreadable(tmp_path):
    with pytest.raises(power.MeterError, match="no RAPL"):
        power.rapl(str(tmp_path))


def test_energy_between_counter_and_trapezoid():
    counter = [(0.0, None, 0.0), (1.0, None, 10.0), (2.0, None, 30.0)]
    assert power.energy_between(counter, 0.5, 1.5) == pytest.approx(5 + 5 * 2)
    watts = [(0.0, 10.0, None), (1.0, 10.0, None), (2.0, 20.0, None)]
    assert power.energy_between(watts, 0.5, 1.5) == pytest.approx(5 + 0.5 * 12.5)
    assert power.energy_between(watts[:1], 0, 1) is None


def test_summary_reports_avg_idle_and_per_inference():
    trace = [(t / 10, 5.0 if t < 10 else 15.0, None) for t in range(0, 31)]
    s = power.summarize(trace, idle=(0.0, 0.9), window=(1.0, 3.0), inferences=100, meter="x")
    assert s["idle_w"] == pytest.approx(5.0) and s["avg_w"] == pytest.approx(15.0)
    assert s["j_per_inference"] == pytest.approx(0.3)
    assert s["dynamic_j_per_inference"] == pytest.approx(0.2)
    assert s["reason"] is None and s["trace"]


def _script(tmp_path, body):
    p = tmp_path / "meter.py"
    p.write_text(body)
    return f"{sys.executable} -u {p}"


def test_command_meter_watts_end_to_end(tmp_path):
    cmd = _script(tmp_path, "import time\nwhile True:\n    print('12.5 W', flush=True)\n"
                            "    time.sleep(0.01)\n")
    read, close = power.open_meter(f"command:{cmd}")
    try:
        s = power.Sampler(read, 0.01).start()
        t0 = time.perf_counter()
        time.sleep(0.3)
        t1 = time.perf_counter()
        s.stop()
    finally:
        close()
    e = power.energy_between(s.trace, t0, t1)
    assert e == pytest.approx(12.5 * (t1 - t0), rel=1e-6)


def _two_readings(meter, gap_s: float = 0.2) -> tuple[tuple, tuple]:
    """Two (watts, joules) readings `gap_s` apart from an open meter (read, close); closes it."""
    read, close = meter
    try:
        first = read()
        time.sleep(gap_s)
        second = read()
    finally:
        close()
    return first, second


@pytest.mark.load
def test_command_meter_joules_counter(tmp_path):
    cmd = _script(tmp_path, "import time\nj=100.0\nwhile True:\n    print(f'{j} J', flush=True)\n"
                            "    j += 1.0\n    time.sleep(0.02)\n")
    (_, j0), (w, j1) = _two_readings(power.open_meter(f"command:{cmd}"))
    assert w is None and j0 < j1 and 5 <= j1 - j0 <= 15  # ~1 J every 20 ms


def test_command_meter_without_readings_is_a_reason(tmp_path):
    cmd = _script(tmp_path, "print('hello')\n")
    with pytest.raises(power.MeterError, match="no reading"):
        power.open_meter(f"command:{cmd}")


def test_unknown_meter_and_none():
    assert power.open_meter("none") is None
    with pytest.raises(power.MeterError, match="unknown power meter"):
        power.open_meter("volts")


def test_parse_reading_units():
    assert power.parse_reading("850mW") == ("W", pytest.approx(0.85))
    assert power.parse_reading("3.5") == ("W", 3.5)
    assert power.parse_reading("41000 uJ") == ("J", pytest.approx(0.041))
    assert power.parse_reading("no number") is None


def test_nvml_meter():
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        with pytest.raises(power.MeterError, match="NVML unavailable"):
            power.nvml(0)
        pytest.skip(f"no NVIDIA GPU/driver here ({e}); the meter reports null with this reason")
    (w0, j0), (w1, j1) = _two_readings(power.nvml(0))
    assert w1 > 0 and j1 >= j0 >= 0
