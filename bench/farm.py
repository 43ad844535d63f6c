"""The nightly on a Ray cluster: each device an exclusive Ray resource on the node that reaches
it, artifacts built as tasks anywhere, every measurement written to one shared store.

Ray is the scheduler (`pip install -c constraints.txt -e '.[ray]'`); hilq adds no queue of its
own. A node declares the devices it can reach when it joins:

    ray start --address HEAD:6379 --resources '{"device:edge1": 1, "device:edge2": 1}'

and a measurement task for edge1 asks for `device:edge1: 1`, so Ray runs it on that node and
never two at once. The task is the thread engine's own per-device loop (`matrix.bench_device`:
alternating rounds, one artifact per agent process, the device lock, the store's natural keys),
so both engines write the same rows. Build tasks (quantize, calibrate, export) ask for a CPU
and run on any node; their files come back through Ray's object store and are checked by
sha256 where they land. A node that dies mid-measurement fails its devices with a typed
failure (`unreachable`) while the others go on; measurement tasks are never retried (a
half-timed measurement is not safe to repeat), build tasks are. `hilq nightly --resume RUN`
then fills in exactly the rows that are missing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from hilq.quant.artifact import Artifact

from .errors import UserError

MEASURE_RETRIES = 0          # a half-timed measurement is not repeated
BUILD_RETRIES = 3            # building is pure: safe to run again elsewhere
POLL_S = 0.5


class FarmError(UserError):
    """The cluster cannot run this nightly as configured (one line, names the problem)."""


# --- artifacts through the object store ---------------------------------------------------
def pack(art: Artifact) -> dict:
    """An artifact's files as bytes (the file, its manifest, the evaluation set it names)."""
    files = {Path(art.path).name: Path(art.path).read_bytes(),
             art.manifest_path.name: art.manifest_path.read_bytes()}
    ev = (art.manifest.get("eval_set") or {}).get("file")
    if ev:
        for p in (Path(art.path).parent / ev, Path(art.path).parent / f"{ev}.manifest.json"):
            if p.is_file():
                files[p.name] = p.read_bytes()
    return {"name": Path(art.path).name, "sha256": art.sha256, "files": files}


def unpack(packed: dict, into: str | Path) -> Artifact:
    """Write a packed artifact under `into` (content-addressed: reused when there) and check
    it against the sha256 it was built with."""
    d = Path(into) / packed["sha256"][:16]
    d.mkdir(parents=True, exist_ok=True)
    for name, blob in packed["files"].items():
        p = d / name
        if not p.is_file() or p.stat().st_size != len(blob):
            tmp = p.with_suffix(p.suffix + ".part")
            tmp.write_bytes(blob)
            tmp.replace(p)
    art = Artifact.load(d / packed["name"])
    got = hashlib.sha256(Path(art.path).read_bytes()).hexdigest()
    if got != packed["sha256"] or art.sha256 != packed["sha256"]:
        raise FarmError(f"{packed['name']}: sha256 {got[:12]} after transfer, built as "
                        f"{packed['sha256'][:12]}")
    return art


# --- the tasks ------------------------------------------------------------------------------
def _build(ref, variant: str, out_dir: str, runtime: str, seed: int, calib_data: str) -> dict:
    """A Ray task on any node: build one artifact there, return its files."""
    from hilq.bench import runner

    art = runner.artifact_for(ref, variant, out_dir, runtime, seed=seed, calib_data=calib_data)
    return {**pack(art), "node": _where()}


def _measure(cfg, run_id: str, name: str, tasks: list, board) -> dict:
    """A Ray task on the node that owns `device:<name>`: the thread engine's per-device loop."""
    import ray
    from hilq.devices import inventory

    from .errors import one_line
    from .matrix import bench_device
    from .store import open_store

    where = _where()
    board.update.remote(name, "running", where)
    scratch = Path(tempfile.gettempdir()) / "hilq-farm" / "artifacts"
    out = {"device": name, "node": where, "rows": [], "failures": []}
    store = open_store(cfg.db)
    try:
        device = inventory.open_device(name, inventory.load(cfg.inventory))
        try:
            local = [(b, runtime, {v: unpack(ray.get(ref), scratch) for v, ref in arts.items()})
                     for b, runtime, arts in tasks]
            out["rows"], out["failures"] = bench_device(
                cfg, store, run_id, device, local, lambda s: board.say.remote(s))
        finally:
            device.close()
    except Exception as e:  # noqa: BLE001 — one device failing must not stop the others
        out["failures"].append((f"device {name}", one_line(e)))
    finally:
        store.close()
    board.update.remote(name, "failed" if out["failures"] else "done", where)
    return out


def _where() -> dict:
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "host": socket.gethostname(),
            "ip": ray.util.get_node_ip_address()}


class _Board:
    """One progress view across the cluster: each device queued, running, done or failed,
    and where; progress lines from the tasks, in arrival order."""

    def __init__(self, devices: list[str]):
        self.state = {d: ("queued", None) for d in devices}
        self.lines: list[str] = []

    def update(self, device: str, state: str, where: dict | None) -> None:
        self.state[device] = (state, where)

    def say(self, line: str) -> None:
        self.lines.append(line)

    def read(self, since: int) -> tuple[dict, list[str]]:
        return self.state, self.lines[since:]


# --- the driver ------------------------------------------------------------------------------
def connect(address: str | None, devices: list[str] = (), say=lambda s: None):
    """Join the cluster at `address` ("auto": the one this machine belongs to). No address
    starts a local instance, Ray's own convention, with this machine declaring every device
    of the night (it reaches them all: local or over SSH) — one machine before a cluster."""
    try:
        import ray
    except ImportError:
        raise FarmError("engine 'ray' needs Ray: pip install -c constraints.txt -e '.[ray]'") \
            from None
    if not ray.is_initialized():
        where = address or "a local instance"
        kw = {"address": address} if address else {
            "resources": {f"device:{d}": 1 for d in devices}, "num_cpus": os.cpu_count() or 1}
        try:
            ray.init(**kw, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise FarmError(f"cannot reach the Ray cluster at {where}: "
                            f"{str(e).splitlines()[0]}") from None
        if not address:
            say(f"[farm] started a local Ray instance (no --ray-address): "
                f"{', '.join(devices)} on this machine")
    return ray


def check(ray, db: str, devices: list[str]) -> dict[str, str]:
    """Refuse what cannot work: SQLite on a cluster of several nodes (each would write its own
    file), a device no live node declares. Returns device -> the node id that owns it."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in db:
        raise FarmError(f"store {db} is a SQLite file, which nodes of a Ray cluster do not "
                        f"share ({len(nodes)} nodes); use a PostgreSQL URL (db = "
                        "\"postgresql://...\")")
    owner = {}
    for n in nodes:
        for res in n.get("Resources", {}):
            if res.startswith("device:"):
                owner.setdefault(res[len("device:"):], n["NodeID"])
    return {d: owner.get(d) for d in devices}


def build_all(ray, jobs: list[tuple], out_dir: str, say) -> dict[tuple, object]:
    """Build tasks anywhere in the cluster: (ref, variant, runtime, seed, calib) -> ObjectRef
    of the packed artifact."""
    task = ray.remote(num_cpus=1, max_retries=BUILD_RETRIES)(_build)
    refs = {job: task.remote(job[0], job[1], out_dir, *job[2:]) for job in jobs}
    say(f"building {len(refs)} artifacts on the cluster")
    return refs


def measure_all(ray, cfg, run_id: str, per_device: dict[str, list], owners: dict[str, str],
                say: Callable[[str], None]) -> list[dict]:
    """One measurement task per device, on its owner node; progress shown as it goes; a task
    lost with its node is the device's typed failure. Returns each device's outcome."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    board = ray.remote(num_cpus=0)(_Board).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
        list(per_device))
    task = ray.remote(num_cpus=0, max_retries=MEASURE_RETRIES)(_measure)
    pending, out = {}, []
    for name, tasks in per_device.items():
        if owners.get(name) is None:
            out.append({"device": name, "node": None, "rows": [], "failures": [
                (f"device {name}", f"unreachable: no live Ray node declares device:{name}")]})
            continue
        ref = task.options(resources={f"device:{name}": 1}).remote(cfg, run_id, name, tasks,
                                                                  board)
        pending[ref] = name
    try:
        _follow(ray, pending, board, owners, say, out)
    except KeyboardInterrupt:       # Ctrl-C, SIGTERM: stop every device's agent where it runs
        _cancel(ray, pending, say)
        raise
    return out


def _follow(ray, pending: dict, board, owners: dict, say, out: list) -> None:
    """Wait for the measurement tasks, showing their lines and states as they come; each
    task's outcome (or its typed failure) joins `out` and leaves `pending`."""
    seen, shown = 0, {}
    while pending:
        done, _ = ray.wait(list(pending), timeout=POLL_S)
        try:
            state, lines = ray.get(board.read.remote(seen), timeout=10)
        except ray.exceptions.RayError:
            state, lines = {}, []
        seen += len(lines)
        for line in lines:
            say(line)
        for dev, (st, where) in state.items():
            if shown.get(dev) != st:
                shown[dev] = st
                say(f"[farm] {dev}: {st}" + (f" on {where['host']} node {where['node_id'][:8]}"
                                             if where else ""))
        for ref in done:
            name = pending.pop(ref)
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:   # hilq's own code failed there
                why = str(e.cause if getattr(e, "cause", None) else e).splitlines()[0]
                out.append({"device": name, "node": {"node_id": owners[name]}, "rows": [],
                            "failures": [(f"device {name}", f"agent_crash: {why}")]})
            except ray.exceptions.RayError as e:      # the node or its worker died
                why = type(e).__name__
                say(f"[farm] {name}: failed ({why})")
                out.append({"device": name, "node": {"node_id": owners[name]}, "rows": [],
                            "failures": [(f"device {name}", f"unreachable: its Ray node was "
                                          f"lost mid-run ({why})")]})


def _cancel(ray, pending: dict, say, wait_s: float = 15.0) -> None:
    """Cancel the running tasks: Ray raises KeyboardInterrupt inside each, and its device's
    wait kills the agent's process group (as on Ctrl-C at home). Wait a little for them to
    unwind, so no agent outlives the night on a node."""
    for ref in pending:
        ray.cancel(ref)
    say(f"[farm] interrupted: cancelling {len(pending)} device task(s)")
    try:
        ray.wait(list(pending), num_returns=len(pending), timeout=wait_s)
    except Exception:    # noqa: BLE001 — a lost node cannot be waited for; the signal stands
        pass
