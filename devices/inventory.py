"""The device inventory (`devices.toml`): which targets exist and how to reach them.

    [devices.edge1]
    kind = "ssh"                          # or "local"
    host = "127.0.0.1"                    # or a Host alias of the ssh config
    port = 2222                           # default: the ssh config's Port, else 22
    user = "bench"                        # default: the ssh config's User, else the local user
    key_file = "~/.ssh/id_ed25519"        # default: IdentityFile, ssh-agent, ~/.ssh/id_*
    known_hosts = "~/.ssh/known_hosts"    # host keys are always verified; unknown -> refused
    ssh_config = "~/.ssh/config"          # the default may be missing; "none": read none
    jump = "jump@bastion:22"              # default: ProxyJump; "a,b" a chain; "none" no jump
    python = "python3"
    workdir = "/tmp/hilq"
    runtimes = ["ort"]
    power = "none"                        # nvml | rapl | tegrastats | command:<cmd> | none

Validated at the boundary: an unknown key or a wrong type is a one-line error naming it.
An ssh device needs `host`; `key_file` only when nothing else could authenticate (no
IdentityFile for the host in the ssh config, no ssh-agent, no default key), and a named
`ssh_config` must exist, so a device that cannot log in fails here, not mid-night.
The ssh config's values fill in what the table leaves out (devices/ssh_route.py).
`local` (this machine, no meter) exists even without a file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .device import Device
from .errors import DeviceError

_COMMON = {"kind": str, "python": str, "workdir": str, "runtimes": list, "power": str,
           "command_timeout_s": (int, float)}
KEYS = {
    "local": _COMMON,
    "ssh": {**_COMMON, "host": str, "port": int, "user": str, "key_file": str,
            "known_hosts": str, "ssh_config": str, "jump": str,
            "connect_timeout_s": (int, float), "retries": int, "cache_max_mb": (int, float)},
}
REQUIRED = {"local": (), "ssh": ("host",)}
POWER_KINDS = ("nvml", "rapl", "tegrastats", "command", "none")


def _bad(msg: str) -> DeviceError:
    return DeviceError("bad_input", msg)


def validate(name: str, cfg: dict, where: str = "inventory") -> dict:
    kind = cfg.get("kind", "local")
    if kind not in KEYS:
        raise _bad(f"{where}: [devices.{name}] kind = {kind!r}: use 'local' or 'ssh'")
    for key, value in cfg.items():
        if key not in KEYS[kind]:
            raise _bad(f"{where}: [devices.{name}] unknown key {key!r} for kind {kind!r}")
        if not isinstance(value, KEYS[kind][key]) or isinstance(value, bool):
            raise _bad(f"{where}: [devices.{name}] {key} has the wrong type "
                       f"({type(value).__name__})")
    for key in REQUIRED[kind]:
        if key not in cfg:
            raise _bad(f"{where}: [devices.{name}] missing required key {key!r}")
    power = cfg.get("power", "none")
    if power.partition(":")[0] not in POWER_KINDS:
        raise _bad(f"{where}: [devices.{name}] power = {power!r}: use "
                   "nvml | rapl | tegrastats | command:<cmd> | none")
    if not all(isinstance(r, str) for r in cfg.get("runtimes", [])):
        raise _bad(f"{where}: [devices.{name}] runtimes must be a list of names")
    if kind == "ssh":
        _check_route(name, cfg, where)
    return {"kind": kind, **cfg}


def _check_route(name: str, cfg: dict, where: str):
    """The ssh config readable and something to log in with (paramiko imported only here)."""
    from . import ssh_route

    try:
        hops = ssh_route.resolve(cfg["host"], cfg.get("port"), cfg.get("user"),
                                 cfg.get("key_file"), cfg.get("jump"), cfg.get("ssh_config"))
    except DeviceError as e:
        raise _bad(f"{where}: [devices.{name}] {e}") from None
    if not ssh_route.has_identity(hops[-1]):
        raise _bad(f"{where}: [devices.{name}] missing required key 'key_file' (no "
                   f"IdentityFile for {cfg['host']!r} in the ssh config, no ssh-agent, "
                   "no ~/.ssh/id_* key)")


def load(path: str | Path | None = None) -> dict[str, dict]:
    """name -> validated config; `local` is always there (a file may override it)."""
    devices = {"local": {"kind": "local"}}
    if path is None:
        return devices
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise _bad(f"{path}: not valid TOML: {e}") from e
    extra = set(data) - {"devices"}
    if extra:
        raise _bad(f"{path}: unknown top-level key {sorted(extra)[0]!r} (only [devices.NAME])")
    for name, cfg in data.get("devices", {}).items():
        if not isinstance(cfg, dict):
            raise _bad(f"{path}: devices.{name} must be a table")
        devices[name] = validate(name, cfg, str(path))
    return devices


def open_device(name: str, devices: dict[str, dict]) -> Device:
    """A LocalDevice or SSHDevice for `name` from a loaded inventory."""
    if name not in devices:
        raise _bad(f"unknown device {name!r} (known: {', '.join(sorted(devices))})")
    cfg = dict(devices[name])
    kind = cfg.pop("kind")
    if kind == "local":
        from .local import LocalDevice

        return LocalDevice(name, **cfg)
    from .ssh import SSHDevice

    return SSHDevice(name, **cfg)
