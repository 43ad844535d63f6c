"""Resume, measured: a nightly (bench matrix, then a search) is killed with SIGKILL at several
points, counted in agent starts, some of them inside the search's cost table (the profile
patterns' timed runs and their profiles) and inside its loop; the rerun must start exactly
the agents whose rows were missing, leave every row stored before the kill unchanged, store no
duplicate, and leave SQLite's integrity check ok.

The store's unique keys would hide a runner that measures everything again (ON CONFLICT DO
NOTHING), so the agent starts themselves are counted: the inventory's `python` for `local` is
a wrapper that logs each call, then execs the real interpreter."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import DIGITS_SEARCH, QUICK_PROTOCOL, write_nightly_config

ROOT = Path(__file__).resolve().parent.parent

# the nightly killed and rerun: the bench matrix, then a search
NIGHTLY = {"rounds": 2, "protocol": {**QUICK_PROTOCOL, "threads": 1}, "search": [DIGITS_SEARCH]}

# Agent starts, in order (one device, so one at a time): 1-4 the bench matrix (2 variants x
# 2 rounds), 5-12 the search's four profile patterns timed x 2 rounds, 13-16 their profiles,
# 17- the loop's picks beside the uniforms. A kill point k kills the nightly while its k-th
# agent runs.
KILL_POINTS = {"bench": 3, "cost-table-timing": 7, "cost-table-profiles": 14, "loop": 19}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One folder for every kill point: the artifacts (built once, cached by their settings)
    sit beside the stores, each kill point with its own store."""
    d = tmp_path_factory.mktemp("resume")
    wrapper = d / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$$ $*" >> "$HILQ_TEST_AGENT_LOG"\n'
                       f'exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    (d / "devices.toml").write_text(f'[devices.local]\nkind = "local"\npython = "{wrapper}"\n'
                                    f'workdir = "{d / "work"}"\n')
    return d


def _env(log: Path) -> dict:
    env = dict(os.environ, HILQ_TEST_AGENT_LOG=str(log))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HILQ_CACHE", str(ROOT / ".cache"))
    return env


def _starts(log: Path) -> list[tuple[int, list[str]]]:
    """(pid, argv) of each measuring agent start (`--facts` calls are not runs)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        pid, *argv = line.split()
        if "--artifact" in argv:
            out.append((int(pid), argv))
    return out


def _sha(argv: list[str]) -> str | None:
    manifest = Path(argv[argv.index("--artifact") + 1] + ".manifest.json")
    return json.loads(manifest.read_text()).get("sha256") if manifest.exists() else None


def _rows(db_path: Path) -> dict[int, tuple]:
    with sqlite3.connect(db_path) as db:
        return {r[0]: tuple(r) for r in db.execute("select * from measurements")}


def _kill_at(cmd, cwd: Path, log: Path, k: int, timeout_s: float = 400) -> None:
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(log), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while len(_starts(log)) < k:
            assert proc.poll() is None, f"the nightly ended after {len(_starts(log))} starts"
            assert time.monotonic() < deadline, "the kill point was never reached"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid, _ in _starts(log):        # the agent runs in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _check_db(db_path: Path) -> tuple[dict, list, dict, dict]:
    """(rows, runs, kinds, sha by row) of a store, after checking its integrity and that no
    measurement is stored twice."""
    with sqlite3.connect(db_path) as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        runs = db.execute("select id, status from runs").fetchall()
        keys = db.execute("select count(distinct run_id || model || variant || device || "
                          "runtime || kind || round), count(*) from measurements").fetchone()
        kinds = dict(db.execute("select kind, count(*) from measurements group by kind"))
        sha_of = dict(db.execute("select id, artifact_sha256 from measurements"))
    assert keys[0] == keys[1], "duplicate rows"
    return _rows(db_path), runs, kinds, sha_of


def _measured_exactly_the_missing(log: Path, before: dict, after: dict, sha_of: dict,
                                  killed: bool) -> None:
    """Every measuring agent a rerun started made one new row, and no new row came without
    one (the killed start, the last, made none; the debug run on the pick stores no
    measurement, so starts count only artifacts that were measured)."""
    starts = [a for _, a in _starts(log)][:-1 if killed else None]
    measured = set(sha_of.values())
    reruns = Counter(s for s in map(_sha, starts) if s in measured)
    new = Counter(sha_of[i] for i in after if i not in before)
    assert reruns == new
    assert sum(new.values()) == len(after) - len(before) > 0


@pytest.mark.slow
def test_a_nightly_killed_again_and_again_reruns_exactly_the_missing_agents(shared):
    """One night killed with SIGKILL at each kill point in turn (the bench matrix, the cost
    table's timing and profiles, the loop), each rerun killed at the next point, then a last
    rerun completes it: one night's work in all, not one per kill point."""
    db_path, cfg = shared / "chain.sqlite", shared / "chain.toml"
    write_nightly_config(cfg, name="resume-chain", db=db_path,
                         inventory=shared / "devices.toml", **NIGHTLY)
    cmd = [sys.executable, "-m", "hilq", "nightly", "--config", str(cfg), "--no-report"]
    before: dict = {}
    for where, k in KILL_POINTS.items():      # k: the night's k-th agent start, counted over runs
        log = shared / f"chain-{where}.log"
        _kill_at(cmd, shared, log, k - len(before))
        after, runs, _, sha_of = _check_db(db_path)
        assert [s for _, s in runs] == ["running"], where
        assert len(after) == k - 1, where      # every start before the k-th stored, that one killed
        assert {i: after[i] for i in before} == before, f"{where}: a stored row changed"
        if before:
            _measured_exactly_the_missing(log, before, after, sha_of, killed=True)
        before = after
    last = shared / "chain-done.log"
    done = subprocess.run(cmd, cwd=shared, env=_env(last), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode in (0, 4), done.stdout[-3000:] + done.stderr[-3000:]
    after, runs, kinds, sha_of = _check_db(db_path)
    assert [s for _, s in runs] == ["ok" if done.returncode == 0 else "budget_missed"]
    assert {i: after[i] for i in before} == before, "a row stored before the kill changed"
    assert kinds["bench"] == 4 and kinds["profile"] == 4 and kinds["search"] >= 14
    _measured_exactly_the_missing(last, before, after, sha_of, killed=False)
