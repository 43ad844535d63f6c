"""The nightly on a real Ray cluster on loopback: a head and two worker nodes started with
`ray start`, each worker declaring its own devices as Ray resources, PostgreSQL as the store.

Every device's measurements must run on the node that declares it, the rows must match the
thread engine's one for one, a worker killed mid-run must fail only its own devices (typed),
and `--resume` must then fill in exactly the missing rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import DIGITS_BENCH, QUICK_PROTOCOL, agent_pids, require_import, write_nightly_config
from hilq.bench import config
from hilq.bench.nightly import run_nightly
from hilq.bench.store import open_store

try:
    import ray
except ImportError:     # the cluster fixture skips, or fails where HILQ_REQUIRE names ray
    ray = None

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
# a lost node is noticed within a few seconds, not Ray's default half minute
FAST_HEALTH = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
               "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "4"}
NODES = {"a": ("edge0", "edge1"), "b": ("edge2", "edge3")}
KEY = ("model", "variant", "device", "runtime", "kind", "round")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`ray start --head` and one `ray start --block` per worker, in their own sessions so a
    worker can be killed whole (raylet and its workers) like a machine losing power."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **FAST_HEALTH, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                   os.environ.get("PYTHONPATH", "")])}
        # Ray's sockets live under its temp dir: a short path (AF_UNIX paths stop at 107)
        self.temp, self.workers = tempfile.mkdtemp(prefix="ray-", dir="/tmp"), {}
        head = subprocess.run([RAY, "start", "--head", f"--port={self.port}", "--num-cpus=1",
                               "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                               "--disable-usage-stats", f"--temp-dir={self.temp}"],
                              env=self.env, capture_output=True, text=True, timeout=120)
        assert head.returncode == 0, head.stderr[-2000:]

    def add(self, name: str) -> None:
        res = json.dumps({f"device:{d}": 1 for d in NODES[name]})
        log = open(Path(self.temp) / f"worker-{name}.log", "ab")   # noqa: SIM115 — the child's
        self.workers[name] = subprocess.Popen(
            [RAY, "start", f"--address={self.address}", "--num-cpus=1", "--block",
             "--node-ip-address=127.0.0.1", f"--resources={res}", "--disable-usage-stats",
             f"--temp-dir={self.temp}"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def wait_for(self, n_devices: int) -> None:
        ray.init(address=self.address, log_to_driver=False, logging_level="ERROR",
                 ignore_reinit_error=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            have = {r for n in ray.nodes() if n["Alive"] for r in n["Resources"]
                    if r.startswith("device:")}
            if len(have) >= n_devices:
                return
            time.sleep(0.5)
        logs = {p.name: p.read_text()[-1500:] for p in Path(self.temp).glob("worker-*.log")}
        raise AssertionError(f"only {have} joined; workers said: {logs}")

    def kill(self, name: str) -> None:
        os.killpg(self.workers.pop(name).pid, signal.SIGKILL)

    def owner(self) -> dict[str, str]:
        return {r[len("device:"):]: n["NodeID"] for n in ray.nodes() if n["Alive"]
                for r in n["Resources"] if r.startswith("device:")}

    def stop(self) -> None:
        ray.shutdown()
        for p in self.workers.values():
            os.killpg(p.pid, signal.SIGKILL)
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module (a driver joins one cluster per process); the test that
    kills a worker runs last and starts it again."""
    require_import("ray", "ray", "Ray is not installed (pip install -e '.[ray]')")
    c = Cluster(tmp_path_factory.mktemp("farm"))
    try:
        c.add("a")          # one at a time: two raylets starting at once on 2 cores time out
        c.wait_for(2)
        c.add("b")
        c.wait_for(4)
        yield c
    finally:
        c.stop()


def _config(tmp: Path, db: str, address: str, rounds: int = 2):
    inv = tmp / "devices.toml"
    inv.write_text("".join(f'[devices.{d}]\nkind = "local"\nworkdir = "{tmp / d}"\n'
                           for ds in NODES.values() for d in ds))
    path = write_nightly_config(
        tmp / "farm.toml", name="farm", rounds=rounds, db=db, inventory=inv,
        reports=tmp / "reports", engine="ray", ray_address=address,
        protocol={**QUICK_PROTOCOL, "warmup_iters": 5, "min_iters": 30, "min_duration_s": 0.3,
                  "idle_s": None, "threads": 1},
        bench=[{**DIGITS_BENCH, "devices": [d for ds in NODES.values() for d in ds],
                "accuracy": False}])
    return config.load(path)


def _rows(db: str, run_id: str) -> list[tuple]:
    with open_store(db) as s:
        return sorted(tuple(r[k] for k in KEY) for r in s.measurements(run_id))


def test_each_device_is_measured_on_its_node_and_the_rows_match_the_thread_engine(
        cluster, tmp_path, pg_url):
    cfg = _config(tmp_path, pg_url, cluster.address)
    lines = []
    t0 = time.perf_counter()
    res = run_nightly(cfg, say=lines.append, report=False)
    ray_s = time.perf_counter() - t0
    assert res.status == "ok", res.failures
    owner = cluster.owner()
    for dev, node in res.placement.items():            # where each device's task ran
        assert node["node_id"] == owner[dev], (dev, node, owner)
    print("placement:", {d: n["node_id"][:8] for d, n in sorted(res.placement.items())})
    assert {d for d, _ in res.placement.items()} == set(owner)
    assert any("[farm] edge2: running on" in x for x in lines)      # the progress view
    rows = _rows(pg_url, res.run_id)
    assert len(rows) == len(set(rows)) == 4 * 2 * 2     # 4 devices × 2 variants × 2 rounds
    t0 = time.perf_counter()
    threads = run_nightly(replace_engine(cfg, "thread"), say=lambda s: None, report=False)
    thread_s = time.perf_counter() - t0
    # (a 0.07 ms model, timed under other engines' load, may read as a regression of the
    # first night: that verdict is not what this test is about)
    assert threads.status in ("ok", "regressed") and not threads.failures
    assert threads.run_id != res.run_id
    assert _rows(pg_url, threads.run_id) == rows        # one for one, no duplicates
    print(f"wall time, same 4-device nightly: ray {ray_s:.1f} s, threads {thread_s:.1f} s")


def replace_engine(cfg, engine: str):
    from dataclasses import replace

    return replace(cfg, engine=engine)


def test_sqlite_across_nodes_is_refused_in_one_line(cluster, tmp_path):
    from hilq.bench import farm

    with pytest.raises(farm.FarmError, match="SQLite file, which nodes of a Ray cluster do not "
                                             "share"):
        run_nightly(_config(tmp_path, str(tmp_path / "x.sqlite"), cluster.address),
                    say=lambda s: None, report=False)


def test_sigint_to_a_night_on_the_cluster_stops_every_agent_on_every_node(cluster, tmp_path,
                                                                          pg_url):
    """Ctrl-C at `hilq nightly --engine ray` while the devices' agents are timing on both nodes
    (30 s windows): the driver cancels the tasks, each task's device kills its agent and
    removes its session folder, and two seconds after hilq exits (130) no agent is left on any
    node; the run says `interrupted`."""
    _config(tmp_path, pg_url, cluster.address)          # its inventory: tmp/<device> each
    path = write_nightly_config(
        tmp_path / "long.toml", name="farm-interrupt", rounds=1, db=pg_url,
        inventory=tmp_path / "devices.toml", engine="ray", ray_address=cluster.address,
        protocol={**QUICK_PROTOCOL, "min_duration_s": 30.0, "threads": 1},
        bench=[{**DIGITS_BENCH, "devices": [d for ds in NODES.values() for d in ds],
                "accuracy": False}])
    proc = subprocess.Popen([sys.executable, "-m", "hilq", "nightly", "--config", str(path),
                             "--no-report"], cwd=tmp_path, env=cluster.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(agent_pids(tmp_path, timing=True)) < 2:       # agents timing on both nodes
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    time.sleep(2)
    assert agent_pids(tmp_path) == [], "an agent outlived the night on a node"
    # each device unwound (its task cancelled, not its worker killed): sessions removed
    assert not list(tmp_path.glob("edge*/session-*")), list(tmp_path.glob("edge*/*"))
    with open_store(pg_url) as store:
        (run,) = store.rows("runs")
        assert run["status"] == "interrupted", out + err


def test_a_worker_lost_mid_run_fails_its_devices_and_a_resume_fills_in_the_rest(
        cluster, tmp_path, pg_url):
    cfg = _config(tmp_path, pg_url, cluster.address, rounds=3)
    got = {}
    night = threading.Thread(target=lambda: got.update(res=run_nightly(
        cfg, say=lambda s: None, report=False)))
    night.start()
    with open_store(pg_url) as s:                        # kill node b once it has begun
        deadline = time.time() + 300
        while time.time() < deadline and not any(
                r["device"] in NODES["b"] for run in s.runs() for r in s.measurements(run["id"])):
            time.sleep(0.2)
    cluster.kill("b")
    night.join(timeout=600)
    res = got["res"]
    assert res.status == "failed"
    failed = {what.split()[-1] for what, why in res.failures if "unreachable" in why}
    assert failed == set(NODES["b"]), res.failures
    rows = _rows(pg_url, res.run_id)
    full = 4 * 2 * 3
    have_a = [r for r in rows if r[2] in NODES["a"]]
    assert len(have_a) == 2 * 2 * 3                      # node a's devices completed
    assert len(rows) < full
    cluster.add("b")                                     # the machine is back
    cluster.wait_for(4)
    again = run_nightly(cfg, say=lambda s: None, report=False, resume=res.run_id)
    assert again.run_id == res.run_id and again.status == "ok", again.failures
    after = _rows(pg_url, res.run_id)
    assert len(after) == len(set(after)) == full         # exactly the missing rows were added
    assert set(rows) <= set(after)


def test_no_address_starts_a_local_instance_with_the_thread_engines_rows(tmp_path):
    """`hilq nightly --engine ray` with no address on one machine: Ray's convention, a local
    instance (declaring the night's devices here) is started and said so; the rows are the
    thread engine's, key for key."""
    require_import("ray", "ray", "the farm runs on Ray")
    db = str(tmp_path / "s.sqlite")
    cfg = _config(tmp_path, db, None)
    assert cfg.ray_address is None and cfg.engine == "ray"
    out = tmp_path / "night.json"
    # its own HOME: the local instance Ray starts writes ~/.ray/auth_token, which a cluster
    # started later by `ray start` (the fixture above) would then refuse
    env = {**os.environ, "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "hilq", "nightly", "--config", cfg.source,
                        "--no-report", "--json", str(out)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "started a local Ray instance (no --ray-address)" in r.stdout + r.stderr
    ray_run = json.loads(out.read_text())["run_id"]
    threads = run_nightly(replace_engine(config.load(cfg.source), "thread"), say=lambda s: None,
                          report=False)
    assert threads.run_id != ray_run and _rows(db, ray_run) == _rows(db, threads.run_id)
    assert len(_rows(db, ray_run)) == 4 * 2 * 2
