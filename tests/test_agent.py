"""devices/agent.py run as a script from a copied bundle (as on a device): JSON on stdout,
typed exit codes, protocol rules, facts, power, reference check. Real ONNX Runtime."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import QUICK_PROTOCOL
from hilq.devices import bundle, timing
from onnx_tiny import reference_npz, tiny_artifact

QUICK = {**QUICK_PROTOCOL, "min_iters": 30}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """The bundle copied alone into a directory, so nothing from hilq is importable by path."""
    d = tmp_path_factory.mktemp("bundle")
    for src, rel in bundle.files():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d / rel)
    return d


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("art"))


def agent(bundle_dir, *args, protocol=None, tmp=None):
    if protocol is not None:
        (tmp / "p.json").write_text(json.dumps(protocol))
    p = subprocess.run([sys.executable, "-I", str(bundle_dir / "agent.py"), *args],
                       capture_output=True, text=True, cwd=tmp or bundle_dir, timeout=120)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout + p.stderr  # exactly one JSON object on stdout
    return p.returncode, json.loads(lines[0])


def test_measures_with_the_protocol(bundle_dir, art, tmp_path):
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json",
                    protocol={**QUICK, "min_iters": 40, "batch": 3, "threads": 1,
                              "affinity": [0], "mode": "throughput"},
                    tmp=tmp_path)
    assert rc == 0 and out["status"] == "ok", out
    lat = out["latency_ms"]
    assert lat["n"] == len(out["samples_ms"]) >= 40
    assert ("p90" in lat["too_few_for"]) == (lat["n"] < 64)
    assert lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert out["throughput"] == pytest.approx(3 * lat["n"] / out["timing"]["wall_s"])
    assert out["timing"]["batch"] == 3 and out["timing"]["mode"] == "throughput"
    assert out["load"]["cores"] == 1 and out["facts"]["cpu"]["usable_cores"] == 1  # pinned
    assert out["facts"]["engine"]["intra_op_threads"] == 1
    assert out["energy_j_per_inference"] is None and out["power"]["reason"]
    assert set(out["load"]) >= {"loadavg1_before", "loadavg1_after", "busy", "others_busy_during"}
    assert out["harness_overhead_ms"] < 0.1
    assert out["artifact_sha256"] == art.sha256
    flags = out["facts"]["cpu"]["flags"]
    assert {"avx2", "avx512f", "avx512_vnni", "amx_int8"} <= set(flags)


def test_min_duration_also_binds(bundle_dir, art, tmp_path):
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json",
                    protocol={**QUICK, "min_iters": 5, "min_duration_s": 0.3}, tmp=tmp_path)
    assert rc == 0 and out["timing"]["wall_s"] >= 0.3 and out["latency_ms"]["n"] > 5


def test_max_iters_caps_and_says_so(bundle_dir, art, tmp_path):
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json",
                    protocol={**QUICK, "min_iters": 100, "max_iters": 10}, tmp=tmp_path)
    assert rc == 0 and out["latency_ms"]["n"] == 10 and out["timing"]["capped"] == "max_iters"
    assert "max_iters" in out["reason"]


def test_reference_check_and_wrong_answer(bundle_dir, art, tmp_path):
    good = reference_npz(art, tmp_path / "good.npz")
    bad = reference_npz(art, tmp_path / "bad.npz", scale=1.1)
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json", "--reference",
                    str(good), protocol=QUICK, tmp=tmp_path)
    assert rc == 0 and out["outputs_check"]["ok"]
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json", "--reference",
                    str(bad), protocol=QUICK, tmp=tmp_path)
    assert rc == 5 and out["failure"] == "wrong_answer" and not out["outputs_check"]["ok"]


@pytest.mark.parametrize("batch", [1, 2])
def test_reference_check_on_a_fixed_batch_engine(bundle_dir, art, tmp_path, batch):
    """OpenVINO compiles the artifact for the protocol's batch (static shapes); the reference's
    5 samples go through in slices of that batch (the last one padded), and a wrong answer is
    still caught."""
    pytest.importorskip("openvino")
    good = reference_npz(art, tmp_path / "good.npz", n=5)
    bad = reference_npz(art, tmp_path / "bad.npz", scale=1.1, n=5)
    for ref, want_rc in ((good, 0), (bad, 5)):
        rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json", "--runtime",
                        "openvino", "--reference", str(ref), "--rtol", "1e-3", "--atol", "1e-4",
                        protocol={**QUICK, "batch": batch}, tmp=tmp_path)
        assert rc == want_rc, out
        assert out["outputs_check"]["ok"] == (want_rc == 0)


def test_typed_exit_codes(bundle_dir, art, tmp_path):
    rc, out = agent(bundle_dir, "--artifact", str(tmp_path / "missing.onnx"), "--protocol",
                    "p.json", protocol=QUICK, tmp=tmp_path)
    assert rc == 2 and out["failure"] == "bad_input"
    (tmp_path / "bad.json").write_text("{not json")
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "bad.json", tmp=tmp_path)
    assert rc == 2 and out["failure"] == "bad_input"
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json", "--runtime",
                    "tensorrt", protocol=QUICK, tmp=tmp_path)
    assert rc == 3 and out["failure"] == "unsupported"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file")
    rc, out = agent(bundle_dir, "--artifact", str(junk), "--protocol", "p.json",
                    protocol=QUICK, tmp=tmp_path)
    assert rc == 4 and out["failure"] == "runtime_error"


def test_tampered_artifact_is_bad_input(bundle_dir, art, tmp_path):
    copy = tmp_path / "t.onnx"
    shutil.copyfile(art.path, copy)
    Path(str(copy) + ".manifest.json").write_text(json.dumps({**art.manifest, "sha256": "0" * 64}))
    rc, out = agent(bundle_dir, "--artifact", str(copy), "--protocol", "p.json",
                    protocol=QUICK, tmp=tmp_path)
    assert rc == 2 and "sha256" in out["reason"]


def test_command_power_meter_through_the_agent(bundle_dir, art, tmp_path):
    meter = tmp_path / "meter.py"
    meter.write_text("import time\nwhile True:\n    print('7.0 W', flush=True)\n    time.sleep(0.01)\n")
    proto = {**QUICK, "min_duration_s": 0.3, "power": f"command:{sys.executable} -u {meter}",
             "power_interval_s": 0.01, "idle_s": 0.2}
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json",
                    protocol=proto, tmp=tmp_path)
    assert rc == 0, out
    pw = out["power"]
    assert pw["avg_w"] == pytest.approx(7.0) and pw["idle_w"] == pytest.approx(7.0)
    n = out["latency_ms"]["n"]
    assert out["energy_j_per_inference"] == pytest.approx(7.0 * out["timing"]["wall_s"] / n, rel=0.05)
    assert pw["trace"]


def test_unavailable_meter_gives_null_with_reason(bundle_dir, art, tmp_path):
    rc, out = agent(bundle_dir, "--artifact", art.path, "--protocol", "p.json",
                    protocol={**QUICK, "power": "rapl:/nonexistent"}, tmp=tmp_path)
    assert rc == 0 and out["energy_j_per_inference"] is None
    assert "no RAPL" in out["power"]["reason"]


def test_facts_mode(bundle_dir):
    rc, facts = agent(bundle_dir, "--facts", "--runtimes", "ort,tensorrt")
    assert rc == 0
    assert facts["runtimes"]["ort"] and facts["runtimes"]["tensorrt"] is None
    assert facts["cpu"]["logical_cores"] >= 1 and facts["memory_gb"] > 0
    assert facts["python"] and facts["os"]


def test_timing_loop_rules():
    calls = []
    t = timing.measure(lambda: calls.append(1), {"warmup_iters": 7, "warmup_s": 0,
                                                 "min_iters": 25, "min_duration_s": 0})
    assert t.warmup_iters == 7 and len(t.samples_ms) == 25 and len(calls) == 32
    t = timing.measure(timing.busy_wait(1), {"warmup_iters": 0, "min_iters": 1,
                                             "min_duration_s": 0.05})
    assert t.wall_s >= 0.05 and min(t.samples_ms) >= 1.0  # the duration rule bound, not count
    # each cap with the other out of reach (a fast CPU does 100,000 empty calls in 20 ms)
    t = timing.measure(lambda: None, {"min_iters": 10**9, "max_iters": 10**9,
                                      "max_duration_s": 0.02})
    assert t.capped == "max_duration_s" and t.wall_s >= 0.02
    t = timing.measure(lambda: None, {"min_iters": 10**9, "max_iters": 50,
                                      "max_duration_s": 60})
    assert t.capped == "max_iters" and len(t.samples_ms) == 50


class ThreadTimer:
    """A device timer on the thread's CPU clock (what CUDA events are to a GPU runtime)."""

    def start(self):
        self.t0 = time.thread_time_ns()

    def stop(self) -> float:
        return (time.thread_time_ns() - self.t0) / 1e6


def test_device_timer_samples_kept_beside_wall_time():
    marks = []
    t = timing.measure(timing.busy_wait(0.2), {"min_iters": 20, "min_duration_s": 0},
                       device_timer=ThreadTimer(), mark=lambda: marks.append(time.perf_counter()))
    assert len(t.device_samples_ms) == len(t.samples_ms) == 20
    assert marks[0] <= t.t_start and t.t_end <= marks[1]


def _cpuinfo_flags() -> set[str]:
    """The CPU's flags read straight from /proc/cpuinfo, not through the agent's parser."""
    text = Path("/proc/cpuinfo").read_text()
    line = next(ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("flags", "Features"))
    return set(line.split(":", 1)[1].split())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo (not Linux)")
def test_cpu_flags_agree_with_proc_cpuinfo(bundle_dir):
    """Each flag the agent reports is on exactly when /proc/cpuinfo lists it (and this CPU has
    at least one of them, so an agent that says "no" to everything fails here)."""
    rc, facts = agent(bundle_dir, "--facts")
    assert rc == 0
    truth = _cpuinfo_flags()
    flags = facts["cpu"]["flags"]
    assert flags == {f: f in truth for f in flags}
    assert any(flags.values()), truth


def _hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.load
def test_busy_is_set_by_a_cpu_hog_and_clear_without_one(bundle_dir, art, tmp_path):
    """A process spinning on every core while the agent idles and times: `busy`, with the
    others' share measured. Without it the same run is not busy (the machine is shared, so up
    to three tries for a quiet moment)."""
    import os

    proto = {**QUICK, "min_duration_s": 0.5, "idle_s": 0.5, "threads": 1}
    args = ("--artifact", art.path, "--protocol", "p.json")
    for _ in range(3):
        rc, quiet = agent(bundle_dir, *args, protocol=proto, tmp=tmp_path)
        assert rc == 0, quiet
        if not quiet["load"]["busy"]:
            break
    assert quiet["load"]["busy"] is False, quiet["load"]
    hogs = _hogs(os.cpu_count() or 1)
    try:
        time.sleep(0.2)
        rc, loud = agent(bundle_dir, *args, protocol=proto, tmp=tmp_path)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert rc == 0, loud
    assert loud["load"]["busy"] is True, loud["load"]
    assert loud["load"]["others_busy_during"] >= 0.5
    assert loud["load"]["others_busy_during"] > quiet["load"]["others_busy_during"]
