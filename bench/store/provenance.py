"""What every stored figure carries about where it came from: the git SHA, library versions,
the config's hash, and stable ids for devices and variants (volatile facts left out, so one
machine is one device from night to night)."""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from importlib import metadata as _md
from pathlib import Path

from .connection import dumps

# Facts that change from one run to the next on the same machine; left out of the device key.
VOLATILE_FACTS = frozenset({"time", "timestamp", "date", "uptime", "uptime_s", "load",
                            "loadavg", "load_avg", "mem_available", "mem_available_mb",
                            "free_memory", "temperature", "temperature_c", "pid", "boot_time"})
# Library versions recorded with every run (looked up from metadata, nothing is imported).
VERSIONED = ("numpy", "torch", "onnx", "onnxruntime", "openvino", "tensorrt", "scipy",
             "pandas", "sqlalchemy")


def config_hash(config) -> str:
    return hashlib.sha256((dumps(config) or "null").encode()).hexdigest()


def stable_facts(facts: dict) -> dict:
    return {k: v for k, v in (facts or {}).items() if k not in VOLATILE_FACTS}


def device_id(name: str, facts: dict) -> str:
    return hashlib.sha256(dumps([name, stable_facts(facts)]).encode()).hexdigest()[:16]


def variant_id(model: str, name: str, artifact_sha256: str | None, bit_config) -> str:
    key = dumps([model, name, artifact_sha256, dumps(bit_config)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def git_sha(cwd: str | Path | None = None) -> str | None:
    """HEAD of the checkout hilq runs from; None outside git or before the first commit."""
    cwd = cwd or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


@functools.cache
def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            versions[dist] = _md.version(dist)
        except _md.PackageNotFoundError:
            pass
    return versions


def hilq_version() -> str:
    from hilq.bench import __version__

    return __version__
