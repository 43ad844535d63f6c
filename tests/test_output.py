"""Command-line conventions: results on stdout, chatter and progress on stderr, `--json -`
on stdout alone, `--quiet`, and a progress bar that counts agent runs on a terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from hilq.bench.output import Done, Output
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--warmup-iters", "3", "--min-iters", "10", "--min-duration-s", "0.05", "--rounds", "2"]


def _hilq(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hilq", *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": ""})


def test_bench_json_dash_is_the_whole_stdout_and_chatter_goes_to_stderr(tmp_path):
    r = _hilq(tmp_path, "bench", "--model", "digits-cnn", "--variants", "fp32,w8a8",
              *QUICK, "--db", str(tmp_path / "s.sqlite"), "--json", "-")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)                     # nothing but the document
    assert [m["variant"] for m in doc["measurements"]] == ["fp32", "w8a8"]
    assert not (tmp_path / "-").exists()
    # each agent run's line, the stored-run line and the table are on stderr
    assert "digits-cnn w8a8 on local/ort round 2: p50" in r.stderr, r.stderr
    assert "stored as run" in r.stderr and "p50 ms" in r.stderr


def test_quiet_keeps_the_results_and_drops_the_chatter(tmp_path):
    r = _hilq(tmp_path, "bench", "--model", "digits-cnn", "--variants", "fp32", *QUICK,
              "--no-store", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "round 1" not in r.stderr and "round 1" not in r.stdout, r.stderr
    assert "p50 ms" in r.stdout and "fp32" in r.stdout     # the table is a result


def test_a_bad_json_path_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    r = _hilq(tmp_path, "runtimes", "--json", str(tmp_path / "f" / "x.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--json" in r.stderr and "x.json" in r.stderr


def _terminal_output(**kw) -> tuple[Output, io.StringIO]:
    out = Output(**kw)
    buf = io.StringIO()
    out.err = Console(file=buf, force_terminal=True, width=120)
    return out, buf


def test_the_bar_counts_agent_runs_and_stands_in_for_their_lines_on_a_terminal():
    out, buf = _terminal_output()
    with out.progress("bench", 3):
        out.say(Done("m fp32 on local/ort round 1: p50 1.000 ms, ok"))
        out.say("built m: fp32")
        out.say(Done("m fp32 on local/ort round 2: p50 1.000 ms, ok"))
        task = out._bar.tasks[0]
        assert (task.completed, task.total) == (2, 3)
        out.say(Done("a"))
        out.say(Done("b"))                     # one more than planned: no ETA, still counted
        assert (task.completed, task.total) == (4, None)
    text = buf.getvalue()
    assert "built m: fp32" in text             # chatter is printed above the bar


def test_verbose_prints_every_line_under_the_bar_and_quiet_none():
    out, buf = _terminal_output(verbose=True)
    with out.progress("bench", 1):
        out.say(Done("m fp32 on local/ort round 1: p50 1.000 ms, ok"))
    assert "round 1: p50" in buf.getvalue()
    out, buf = _terminal_output(quiet=True)
    with out.progress("bench", 1):
        out.say(Done("m fp32 round 1"))
        out.say("built m")
    assert buf.getvalue() == ""
