"""The agent bundle as the host sees it: which files travel to the device, the agent's
command line, how long a run may take, and how the agent's answer becomes a `Measurement`.
Local and SSH devices share this, so a local run takes the same path as a remote one.
"""

from __future__ import annotations

import json
from pathlib import Path

from hilq import measurement
from hilq.measurement import Measurement, Protocol

from .agent import FAILURE_OF_EXIT

EXIT_FAILURES = {c: k for c, k in FAILURE_OF_EXIT.items() if c}  # the agent's exit codes

HERE = Path(__file__).resolve().parent
CORE = Path(measurement.__file__).resolve().parent   # the numpy-only core the agent shares


def files() -> list[tuple[Path, str]]:
    """(local file, path relative to the bundle dir on the device): the agent and its
    siblings, the core's modules beside them (flat: the agent imports them top-level), and
    one module per runtime."""
    out = [(HERE / n, n) for n in ("agent.py", "failures.py", "machine.py", "window.py",
                                   "evaluation.py", "memory.py", "scenario.py", "timing.py",
                                   "power.py")]
    out += [(CORE / n, n) for n in ("accuracy.py", "stats.py", "measurement.py")]
    out += [(p, f"runtimes/{p.name}") for p in sorted((HERE / "runtimes").glob("*.py"))]
    return out


DEADLINE_GRACE_S = 10.0   # the agent's own deadline, past the host's: the host kills first


def agent_args(artifact: str, protocol: str, runtime: str, reference: str | None = None,
               rtol: float = 1e-3, atol: float = 1e-4, evalset: str | None = None,
               timeout_s: float | None = None) -> list[str]:
    # --scratch .: engine scratch files live in the session folder the device removes, so
    # even an agent killed at a timeout leaves nothing behind; --deadline-s: an agent the
    # host cannot reach to kill (a partition) ends itself soon after the host gave up
    args = ["agent.py", "--artifact", artifact, "--protocol", protocol, "--runtime", runtime,
            "--scratch", "."]
    if timeout_s:
        args += ["--deadline-s", f"{timeout_s + DEADLINE_GRACE_S:.0f}"]
    if reference:
        args += ["--reference", reference, "--rtol", repr(rtol), "--atol", repr(atol)]
    if evalset:
        args += ["--eval", evalset]
    return args


def run_timeout(protocol: Protocol, margin_s: float = 120.0) -> float:
    """Longest a healthy run can take: warm-up, idle baseline, the measuring cap, plus
    margin for loading the engine (and warm-up counts on slow models)."""
    scenario = protocol.max_duration_s if protocol.scenario else 0.0   # LoadGen's run after ours
    return protocol.warmup_s + protocol.idle_s + protocol.max_duration_s + scenario + margin_s


def to_measurement(rc: int | None, stdout: str, stderr: str, *, model: str, variant: str,
                   device: str, runtime: str, protocol: Protocol) -> Measurement:
    """The agent's JSON line (or the lack of one) -> a Measurement, typed on failure."""
    ident = {"model": model, "variant": variant, "device": device, "runtime": runtime}
    result = None
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
            break
        except ValueError:
            continue
    if not isinstance(result, dict):
        tail = " | ".join(stderr.strip().splitlines()[-3:]) or "no output"
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit {rc}"
        return Measurement.failed(**ident, failure=EXIT_FAILURES.get(rc, "agent_crash"),
                                  reason=f"agent gave no result ({how}): {tail}",
                                  protocol=protocol.to_dict())
    result.setdefault("protocol", protocol.to_dict())
    if result.get("status") == "failed" or rc != 0:
        failure = result.get("failure") or EXIT_FAILURES.get(rc, "agent_crash")
        extra = {k: v for k, v in result.items()
                 if k in ("facts", "outputs_check", "protocol")}
        return Measurement.failed(**ident, failure=failure,
                                  reason=result.get("reason") or f"agent exit {rc}", **extra)
    return Measurement.from_dict({**result, **ident})


def prepare(artifact, device: str, runtime: str, protocol: Protocol, device_power: str,
            command_timeout_s: float | None) -> tuple[dict, Protocol, float]:
    """What every device does before a run: the identity a failure is stored under, the
    protocol with the device's own meter when the protocol names none, and the timeout."""
    m = artifact.manifest
    ident = {"model": m.get("model", "?"), "variant": m.get("variant", "?"),
             "device": device, "runtime": runtime}
    if protocol.power == "none" and device_power != "none":
        protocol = Protocol.from_dict({**protocol.to_dict(), "power": device_power})
    return ident, protocol, command_timeout_s or run_timeout(protocol)
