"""Bad input, tried as a new user would, across every `hilq` command: each gets exit 2 (the
documented code for input a user can fix), exactly one line on stderr that names the offending
value, and no traceback. The usage block is for `--help` only.

Most cases run `bench.cli.main` in this process with the file descriptors captured (what a
C library writes to fd 2 counts too); a few run the real `hilq` entry point in a subprocess.
Cases that the quantize and user-model tests already cover are not repeated here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hilq.bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
Q = ["quantize", "--model", "digits-cnn", "--w-bits", "8", "--a-bits", "8"]
E = ["export", "--model", "digits-cnn", "--variant", "w8a8"]
S = ["search", "--model", "digits-cnn"]
SENS = ["sensitivity", "--model", "digits-cnn"]

# (argv with {tmp} for the shared fixture folder, the text the one line must contain: the
# offending value with what names it — its option or its meaning — not the value alone)
CASES = [
    # quantize
    (["quantize", "--model", "digits-cnn", "--w-bits", "eight", "--a-bits", "8"], "'eight'"),
    (["quantize", "--model", "digits-cnn", "--w-bits", "8", "--a-bits", "12"],
     "a_bits 12: must be 1..8 (or 16 for weight-only)"),
    ([*Q, "--granularity", "diagonal"], "diagonal"),
    ([*Q, "--calib", "tarot"], "tarot"),
    ([*Q, "--repair", "cle,magic"], "magic"),
    ([*Q, "--distill-objective", "vibes"], "vibes"),
    ([*Q, "--qat-epochs", "-3"], "qat_epochs -3: must be at least 0"),
    ([*Q, "--seed", "one"], "'one'"),
    ([*Q, "--data", "{tmp}/no-such-folder"], "no-such-folder"),
    ([*Q, "--json", "{tmp}/no-such-dir/out.json"], "no-such-dir"),
    ([*Q, "--input-shape", "1,x,28,28"], "1,x,28,28"),
    (["quantize", "--model", "tests.no_such_module:make", "--w-bits", "8", "--a-bits", "8"],
     "tests.no_such_module"),
    (["quantize", "--w-bits", "8", "--a-bits", "8"], "--model"),
    # export
    ([*E[:-1], "w9a8", "--out", "{tmp}/art"], "w9a8"),
    ([*E[:-1], "config:{tmp}/no-such-config.json", "--out", "{tmp}/art"], "no-such-config.json"),
    ([*E, "--out", "/proc/version/out"], "/proc/version/out"),
    ([*E, "--out", "{tmp}/afile"], "afile"),
    ([*E, "--format", "tflite", "--out", "{tmp}/art"], "tflite"),
    ([*E, "--target", "fpga", "--out", "{tmp}/art"], "fpga"),
    ([*E, "--group-size", "0", "--out", "{tmp}/art"], "group size 0"),
    (["export", "--model", "{tmp}/missing.onnx", "--variant", "w8a8", "--out", "{tmp}/art"],
     "missing.onnx"),
    # runtimes
    (["runtimes", "--json", "/proc/version/runtimes.json"], "/proc/version"),
    (["runtimes", "--verbosity"], "--verbosity"),
    (["config", "schema", "yaml"], "'yaml'"),
    (["bench", "--model", "digits-cnn", "--quiet", "--verbose"], "--verbose"),
    # bench
    (["bench", "--runtime", "abacus"], "abacus"),
    (["bench", "--model", "digits-cnn", "--rounds", "0"], "rounds 0: must be at least 1"),
    (["bench", "--model", "digits-cnn", "--device", "nowhere"], "nowhere"),
    (["bench", "--model", "digits-cnn", "--inventory", "{tmp}/no-such.toml"], "no-such.toml"),
    (["bench", "--model", "digits-cnn", "--mode", "turbo"], "turbo"),
    (["bench", "--model", "digits-cnn", "--min-iters", "ten"], "'ten'"),
    (["bench", "--model", "digits-cnn", "--affinity", "a,b"], "--affinity 'a,b'"),
    (["bench", "--artifact", "{tmp}/no-such.onnx"], "no-such.onnx"),
    (["bench", "--model", "digits-cnn", "--variants", "w8a8,w3a77", "--no-store"], "w3a77"),
    (["bench", "--model", "no-such-net"], "no-such-net"),
    # devices
    (["devices", "frob"], "frob"),
    (["devices", "check", "nowhere"], "nowhere"),
    (["devices", "list", "--inventory", "{tmp}/no-such.toml"], "no-such.toml"),
    (["devices", "list", "--inventory", "{tmp}/broken.toml"], "broken.toml"),
    (["devices", "list", "--inventory", "{tmp}/telepathy.toml"], "telepathy"),
    # sensitivity
    ([*SENS, "--method", "tarot"], "tarot"),
    ([*SENS, "--bits", "3,3"], "bits 3,3"),
    ([*SENS, "--bits", "nine"], "nine"),
    ([*SENS, "--act-bits", "0"], "act_bits 0: must be 1..8"),
    ([*SENS, "--samples", "0"], "samples 0: must be at least 1"),
    # allocate
    (["allocate", "--table", "{tmp}/no-such.csv", "--budget", "latency_ms=1"], "no-such.csv"),
    (["allocate", "--table", "{tmp}/costs.csv", "--budget", "latency_ms=fast"], "fast"),
    (["allocate", "--table", "{tmp}/costs.csv", "--budget", "latency_ms"], "latency_ms"),
    (["allocate", "--table", "{tmp}/costs.csv", "--method", "tarot"], "tarot"),
    (["allocate", "--table", "{tmp}/costs.csv", "--budget", "latency_ms=3", "--pin", "conv1"],
     "conv1"),
    (["allocate", "--table", "{tmp}/costs.csv", "--budget", "latency_ms=3", "--tie", "conv1"],
     "conv1"),
    (["allocate", "--table", "{tmp}/nan.csv", "--budget", "latency_ms=3"],
     "latency_ms for 'conv1' 'w8a8' is nan"),
    (["allocate", "--table", "{tmp}/costs.csv", "--sweep", "latency_ms", "--points", "zero"],
     "zero"),
    (["allocate", "--table", "{tmp}/costs.csv", "--budget", "latency_ms=3", "--method",
      "pareto", "--budget", "size_bits=9"], "pareto"),
    # search
    ([*S, "--budget", "latency_ms=fast"], "fast"),
    ([*S, "--budget", "energy_mj=3"], "energy_mj"),
    ([*S, "--budget", "latency_ms=150%"], "--budget 'latency_ms=150%'"),
    ([*S, "--max-drop", "top5=1"], "top5=1"),
    ([*S, "--min-agreement", "2"], "min agreement 2.0"),
    ([*S, "--budget", "latency_ms=50%", "--confidence", "0.3"], "--confidence 0.3"),
    ([*S, "--budget", "latency_ms=50%", "--sensitivity", "vibes"], "vibes"),
    ([*S, "--budget", "latency_ms=50%", "--calib-data", "psychic"], "psychic"),
    ([*S, "--budget", "latency_ms=50%", "--sweep", "1"], "sweep 1: needs at least 2 points"),
    ([*S, "--budget", "latency_ms=50%", "--device", "nowhere"], "nowhere"),
    # nightly
    (["nightly", "--config", "{tmp}/no-such.toml"], "no-such.toml"),
    (["nightly", "--config", "{tmp}/broken.toml"], "broken.toml"),
    (["nightly", "--config", "{tmp}/unknown-key.toml"], "colour"),
    (["nightly", "--fail-on-regresion"], "--fail-on-regresion"),
    # compare
    (["compare", "no-such-run", "latest", "--db", "{tmp}/store.sqlite"], "no-such-run"),
    # report
    (["report", "--run", "no-such-run", "--db", "{tmp}/store.sqlite"], "no-such-run"),
    (["report", "--db", "/proc/version/hilq.sqlite"], "/proc/version"),
    # results
    (["results", "frobnicate"], "frobnicate"),
    (["results", "export", "--format", "xls", "--out", "{tmp}/x"], "xls"),
    (["results", "runs", "--limit", "many"], "many"),
    (["results", "export", "--table", "no_such_table", "--out", "{tmp}/x", "--db",
      "{tmp}/store.sqlite"], "no_such_table"),
    (["results", "regressions", "--run", "no-such-run", "--db", "{tmp}/store.sqlite"],
     "no-such-run"),
    (["results", "mark-intended", "--model", "m", "--variant", "v", "--device", "d",
      "--runtime", "r"], "--reason"),
    # debug, and the top level
    (["debug", "--no-such-flag"], "--no-such-flag"),
    (["frobnicate"], "frobnicate"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "afile").write_text("not a folder\n")
    (d / "broken.toml").write_text("[[bench]\nmodel = \n")
    (d / "unknown-key.toml").write_text('name = "x"\ncolour = "blue"\n')
    (d / "telepathy.toml").write_text('[devices.mind]\nkind = "telepathy"\n')
    (d / "costs.csv").write_text("layer,precision,sensitivity,latency_ms\n"
                                 "conv1,w8a8,0.1,1.0\nconv1,fp32,0.0,2.0\n"
                                 "fc,w8a8,0.2,1.0\nfc,fp32,0.0,1.5\n")
    (d / "nan.csv").write_text("layer,precision,sensitivity,latency_ms\n"
                               "conv1,w8a8,0.1,nan\nconv1,fp32,0.0,2.0\n")
    from hilq.bench.store import open_store

    with open_store(str(d / "store.sqlite")) as store:
        store.finish_run(store.begin_run({"command": "test"}), "ok")
    return d


def test_the_battery_covers_every_command_with_at_least_50_inputs():
    from hilq.bench.cli import COMMANDS

    assert len(CASES) >= 50
    assert {argv[0] for argv, _ in CASES} >= set(COMMANDS)


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_naming_the_value_exit_2(argv, needle, tmp, capfd, monkeypatch):
    monkeypatch.chdir(tmp)       # nothing a case writes lands in the repository
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:      # argparse's rejections leave through sys.exit
        rc = e.code
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err
    assert lines[0].startswith("hilq"), lines[0]
    assert needle in lines[0], lines[0]


def _hilq(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hilq", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (("quantize", "--model", "digits-cnn", "--w-bits", "eight", "--a-bits", "8"), "'eight'"),
    (("allocate", "--table", "x.csv", "--method", "tarot"), "'tarot'"),
    (("bench", "--runtime", "abacus"), "'abacus'"),
    (("export", "--model", "digits-cnn", "--variant", "w8a8", "--out", "/proc/version/out"),
     "/proc/version/out"),
])
def test_the_real_entry_point_prints_one_line(args, needle):
    r = _hilq(*args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_help_still_shows_the_usage():
    r = _hilq("quantize", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: hilq quantize")
