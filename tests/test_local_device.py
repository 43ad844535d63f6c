"""LocalDevice (agent in a fresh subprocess from a temp copy of the bundle), the device
lock, and the runner's alternating rounds, with real ONNX Runtime."""

import json
import os
import threading
from pathlib import Path

import pytest
from helpers import quick_protocol
from hilq.bench import cli
from hilq.bench.runner import bench_variants, combine
from hilq.devices import lock
from hilq.devices.local import LocalDevice
from onnx_tiny import reference_npz, tiny_artifact

from hilq.measurement import Measurement, Protocol

QUICK = quick_protocol(warmup_iters=2, min_iters=20)


def test_run_and_facts(tmp_path):
    art = tiny_artifact(tmp_path)
    dev = LocalDevice(workdir=str(tmp_path / "work"))
    m = dev.run(art, QUICK, "ort", reference=str(reference_npz(art, tmp_path / "r.npz")))
    assert m.status == "ok" and m.outputs_check["ok"], m.reason
    assert (m.model, m.variant, m.device, m.runtime) == ("tiny", "fp32", "local", "ort")
    assert m.latency_ms["p50"] > 0 and m.facts["cpu"]["flags"]["avx2"] in (True, False)
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["locks"]  # temp dir removed
    assert dev.facts()["runtimes"]["ort"]


def test_timeout_is_typed(tmp_path):
    art = tiny_artifact(tmp_path)
    dev = LocalDevice(workdir=str(tmp_path / "w"), command_timeout_s=1.5)
    slow = Protocol(warmup_iters=1, min_iters=1, min_duration_s=30, idle_s=0.0)
    m = dev.run(art, slow)
    assert m.status == "failed" and m.failure == "timeout"


def test_missing_runtime_is_typed(tmp_path):
    m = LocalDevice(workdir=str(tmp_path / "w")).run(tiny_artifact(tmp_path), QUICK, "tensorrt")
    assert m.failure == "unsupported"


def test_device_power_applies_when_protocol_has_none(tmp_path):
    dev = LocalDevice(workdir=str(tmp_path / "w"), power="rapl:/nonexistent")
    m = dev.run(tiny_artifact(tmp_path), QUICK)
    assert m.ok and m.power["meter"] == "rapl:/nonexistent" and "no RAPL" in m.power["reason"]


def test_local_lock_serializes(tmp_path):
    path = str(tmp_path / "l.lock")
    order = []

    def hold(tag):
        with lock.local_lock(path):
            order.append(f"{tag}+")
            threading.Event().wait(0.1)
            order.append(f"{tag}-")

    ts = [threading.Thread(target=hold, args=(k,)) for k in "ab"]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])


def test_dir_lock_stale_rules(tmp_path):
    path = str(tmp_path / "lock")
    with lock.dir_lock(lock.LocalFS, path, ttl_s=60) as token:
        owner = json.loads((tmp_path / "lock" / "owner").read_text())
        assert owner["token"] == token and not lock.is_stale(owner)
    assert not (tmp_path / "lock").exists()
    assert lock.is_stale({"expires": 0})
    dead = {"host": owner["host"], "pid": 2**22 + 12345, "expires": 9e9, "token": "x"}
    assert lock.is_stale(dead)
    ours_lost = {"host": owner["host"], "pid": os.getpid(), "expires": 9e9, "token": "gone"}
    assert lock.is_stale(ours_lost)
    (tmp_path / "lock").mkdir()
    (tmp_path / "lock" / "owner").write_text(json.dumps(ours_lost))
    with lock.dir_lock(lock.LocalFS, path, ttl_s=60, wait_s=2):
        pass


def test_runner_alternates_rounds_and_pools(tmp_path):
    a = tiny_artifact(tmp_path / "a", width=32)
    b = tiny_artifact(tmp_path / "b", variant="w8a8", width=96)
    order = []
    dev = LocalDevice(workdir=str(tmp_path / "w"))
    real = dev.run
    dev.run = lambda art, *a_, **k: order.append(art.manifest["variant"]) or real(art, *a_, **k)
    ms = bench_variants("", [a, b], dev, "ort", QUICK, rounds=2)
    assert order == ["fp32", "w8a8", "fp32", "w8a8"]
    assert [m.variant for m in ms] == ["fp32", "w8a8"] and all(m.ok for m in ms)
    for m in ms:
        assert m.rounds["n"] == 2 and len(m.rounds["p50_ms"]) == 2
        assert m.latency_ms["n"] == len(m.samples_ms) >= 40


def test_combine_keeps_the_typed_failure():
    ok = Measurement("m", "v", "d", "r", latency_ms={"p50": 1.0}, samples_ms=[1.0], throughput=1)
    bad = Measurement.failed("m", "v", "d", "r", "timeout", "slow")
    c = combine([ok, bad])
    assert c.status == "failed" and c.failure == "timeout" and c.rounds["ok"] == 1


def test_cli_bench_and_devices(tmp_path, capsys):
    art = tiny_artifact(tmp_path)
    out = tmp_path / "o.json"
    rc = cli.main(["bench", "--artifact", art.path, "--device", "local", "--runtime", "ort",
                   "--rounds", "2", "--min-iters", "20", "--min-duration-s", "0.05",
                   "--warmup-s", "0", "--json", str(out), "--no-store"])
    assert rc == 0
    ms = json.loads(out.read_text())["measurements"]
    assert len(ms) == 1
    m = ms[0]
    assert {"variant", "device", "runtime", "status", "latency_ms", "throughput",
            "energy_j_per_inference", "facts"} <= set(m)
    assert {"p50", "p90", "p99", "mean", "std"} <= set(m["latency_ms"])
    assert m["status"] == "ok" and m["energy_j_per_inference"] is None
    assert "fp32" in capsys.readouterr().out

    assert cli.main(["devices", "list"]) == 0
    assert cli.main(["devices", "check", "local", "--json", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())["devices"][0]
    assert d["status"] == "ok" and d["facts"]["cpu"]["logical_cores"] >= 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["bench", "--artifact", art_missing(tmp_path)]) == 2
    assert cli.main(["bench", "--artifact", art_missing(tmp_path), "--device", "nope"]) == 2
    bad = tmp_path / "devices.toml"
    bad.write_text('[devices.x]\nkind = "ssh"\nhots = "h"\n')
    assert cli.main(["devices", "list", "--inventory", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "hots" in err[-1]


def art_missing(tmp_path):
    return str(tmp_path / "missing.onnx")


def test_cli_bench_stores_every_round(tmp_path):
    from hilq.bench.store import Store, resolve_url

    art = tiny_artifact(tmp_path)
    db = tmp_path / "r.sqlite"
    inv = tmp_path / "devices.toml"
    inv.write_text('[devices.box]\nkind = "local"\n')
    assert cli.main(["bench", "--artifact", art.path, "--rounds", "2", "--min-iters", "10",
                     "--min-duration-s", "0.02", "--warmup-s", "0", "--db", str(db),
                     "--device", "local,box", "--inventory", str(inv)]) == 0
    with Store(resolve_url(str(db))) as store:
        rows = store.measurements(store.latest_run())
    assert sorted((r["device"], r["round"]) for r in rows) == [
        ("box", 0), ("box", 1), ("local", 0), ("local", 1)]
    assert all(r["status"] == "ok" and r["p50_ms"] > 0 for r in rows)


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_cli_bench_builds_checks_and_verifies_on_each_cpu_runtime(tmp_path, runtime, capsys):
    """`hilq bench --model` end to end: artifacts built, answers checked against the
    artifact's reference (8 samples; OpenVINO is compiled for batch 1), INT8 kernels read
    from the engine."""
    pytest.importorskip("openvino" if runtime == "openvino" else "onnxruntime")
    out = tmp_path / "o.json"
    assert cli.main(["bench", "--model", "digits-cnn", "--variants", "fp32,w8a8", "--runtime",
                     runtime, "--rounds", "1", "--min-iters", "10", "--min-duration-s", "0.02",
                     "--warmup-s", "0", "--no-store", "--json", str(out)]) == 0, \
        capsys.readouterr()
    ms = {m["variant"]: m for m in json.loads(out.read_text())["measurements"]}
    assert all(m["status"] == "ok" and m["outputs_check"]["ok"] for m in ms.values())
    assert ms["w8a8"]["outputs_check"]["outputs"] == 1
    assert ms["w8a8"]["kernels"]["integer"] and not ms["w8a8"]["kernels"]["float"]


def test_a_layer_left_float_on_purpose_is_not_a_degraded_run(tmp_path):
    """A per-layer mix keeps some layers float by design; only float kernels beyond those make
    an integer run `degraded`."""
    from hilq.quant.export import build_artifact
    from hilq.quant.models import load_model
    from hilq.quant.pipeline import variant_bit_config
    from hilq.quant.spec import BitConfig
    from hilq.quant.transform import fold_bn

    folded = fold_bn(load_model("digits-cnn").build())
    int8 = variant_bit_config(folded, "w8a8")
    mix = BitConfig({k: v for k, v in int8.layers.items() if k != "fc"})   # fc stays float
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(mix.to_dict()))
    proto = Protocol(warmup_iters=2, warmup_s=0.0, min_iters=5, min_duration_s=0.0, threads=1)
    dev = LocalDevice(workdir=str(tmp_path / "work"))
    for variant, want in ((f"config:{path}", "ok"), ("w8a8", "ok")):
        art = build_artifact("digits-cnn", variant, tmp_path / "art")
        m = dev.run(art, proto, "ort")
        assert m.status == want, m.reason
        assert len(m.kernels["float"]) == (1 if variant.startswith("config:") else 0)


def test_an_integer_claim_that_the_engine_runs_in_float_is_degraded(tmp_path):
    """The real engine runs a layer in float that the manifest says is INT8 (fc left float in
    the graph, the manifest claiming w8a8 throughout): `degraded`, the float layer named."""
    import shutil

    from hilq.quant.artifact import Artifact
    from hilq.quant.export import build_artifact
    from hilq.quant.models import load_model
    from hilq.quant.pipeline import variant_bit_config
    from hilq.quant.spec import BitConfig
    from hilq.quant.transform import fold_bn

    folded = fold_bn(load_model("digits-cnn").build())
    int8 = variant_bit_config(folded, "w8a8")
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(BitConfig({k: v for k, v in int8.layers.items()
                                          if k != "fc"}).to_dict()))
    mix = build_artifact("digits-cnn", f"config:{path}", tmp_path / "art")
    claimed = tmp_path / "claimed.onnx"
    shutil.copyfile(mix.path, claimed)
    manifest = dict(mix.manifest, variant="w8a8")
    manifest["layer_map"] = {n: {**v, "precision": "w8a8"}
                             for n, v in (mix.manifest.get("layer_map") or {}).items()}
    manifest.pop("reference", None)
    Path(str(claimed) + ".manifest.json").write_text(json.dumps(manifest))
    proto = Protocol(warmup_iters=2, warmup_s=0.0, min_iters=5, min_duration_s=0.0, threads=1)
    m = LocalDevice(workdir=str(tmp_path / "work")).run(Artifact.load(claimed), proto, "ort")
    assert m.status == "degraded", (m.status, m.reason)
    assert m.kernels["float"] and all("fc" in k for k in m.kernels["float"])
    assert "float" in m.reason and "fc" in m.reason


def test_local_and_ssh_devices_answer_the_device_protocol():
    """Both transports are `devices.device.Device`s, with run() taking the same arguments."""
    import inspect

    from hilq.devices.device import Device
    from hilq.devices.ssh import SSHDevice

    local = LocalDevice()
    assert isinstance(local, Device)
    ssh = SSHDevice.__new__(SSHDevice)          # no connection: only its shape is checked
    ssh.name, ssh.power = "edge", "none"
    assert isinstance(ssh, Device)
    want = inspect.signature(Device.run).parameters.keys()
    for cls in (LocalDevice, SSHDevice):
        assert inspect.signature(cls.run).parameters.keys() == want, cls.__name__
