"""An SSH device's route, resolved and connected the way OpenSSH would.

OpenSSH users keep hosts, users, ports, keys and bastions in `~/.ssh/config` and their keys in
ssh-agent; hilq reads the same (`paramiko.SSHConfig`), so an inventory may say `host = "board"`
and nothing more. Inventory values override the config's; a missing user is the local one.

Authentication on each hop: its key files (the inventory's `key_file` on the target, else the
config's `IdentityFile`s), then every key in the agent (`SSH_AUTH_SOCK`), then, only when no
key file is named, the default `~/.ssh/id_*` keys. An encrypted key file is never decrypted
here (a benchmark must not stop for a passphrase): the agent has to hold it.

A jump (the inventory's `jump`, else the config's `ProxyJump`; `a,b` is a chain, `none` no
jump) is connected first; each next hop is reached through a `direct-tcpip` channel of the one
before. Every hop's host key is verified against the same known_hosts (RejectPolicy), so a
bastion cannot vouch for what is behind it; every error names the hop it happened on.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

import paramiko
from paramiko.ssh_exception import ConfigParseError

from .errors import DeviceError

DEFAULT_CONFIG = "~/.ssh/config"
DEFAULT_KEYS = ("id_rsa", "id_ecdsa", "id_ed25519")      # what paramiko's look_for_keys tries


@dataclass(frozen=True)
class Hop:
    alias: str                      # as named (inventory host, ProxyJump entry): for messages
    hostname: str
    port: int
    user: str
    key_files: tuple[str, ...] = ()
    key_file_given: bool = False    # the inventory's key_file: missing is an error, not skipped

    def __str__(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def _bad(msg: str) -> DeviceError:
    return DeviceError("bad_input", msg)


def load_config(path: str | None) -> paramiko.SSHConfig:
    """The ssh config at `path` (None: ~/.ssh/config, which may be missing; "none": empty,
    like `ssh -F none`). A file named explicitly must exist: silently ignoring a typo would
    connect somewhere else than the user meant."""
    if path == "none":
        return paramiko.SSHConfig()
    full = os.path.expanduser(path or DEFAULT_CONFIG)
    try:
        return paramiko.SSHConfig.from_path(full)
    except FileNotFoundError:
        if path is None:
            return paramiko.SSHConfig()
        raise _bad(f"ssh_config {full} not found") from None
    except (OSError, ConfigParseError) as e:
        raise _bad(f"ssh_config {full} unreadable: {e}") from e


def _hop(config: paramiko.SSHConfig, alias: str, user: str | None = None,
         port: int | str | None = None, key_file: str | None = None) -> Hop:
    """One hop: given values first, then the config's for `alias`, then OpenSSH's defaults."""
    c = config.lookup(alias)
    try:
        port = int(port or c.get("port", 22))
    except ValueError:
        raise _bad(f"{alias}: port {port or c.get('port')!r} is not a number") from None
    files = (os.path.expanduser(key_file),) if key_file else tuple(c.get("identityfile", ()))
    return Hop(alias, c["hostname"], port, user or c.get("user") or _local_user(), files,
               bool(key_file))


def _local_user() -> str:
    """The account's name, as OpenSSH takes it (getpwuid, not $USER)."""
    return pwd.getpwuid(os.getuid()).pw_name


def _jump_spec(spec: str) -> tuple[str | None, str, str | None]:
    """`[user@]host[:port]` (host may be `[v6]`), as ProxyJump writes a hop."""
    spec = spec.strip().removeprefix("ssh://")
    user, _, rest = spec.rpartition("@")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":") or None
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host, port = rest, None
    if not host:
        raise _bad(f"jump {spec!r}: use [user@]host[:port], comma-separated for a chain")
    return user or None, host, port


def resolve(host: str, port: int | None = None, user: str | None = None,
            key_file: str | None = None, jump: str | None = None,
            ssh_config: str | None = None) -> list[Hop]:
    """The hops to `host`, jumps first, the target last: what `connect` walks."""
    config = load_config(ssh_config)
    target = _hop(config, host, user, port, key_file)
    spec = jump if jump is not None else config.lookup(host).get("proxyjump", "none")
    if spec.strip().lower() in ("", "none"):
        return [target]
    jumps = [_hop(config, h, u, p) for u, h, p in map(_jump_spec, spec.split(","))]
    return [*jumps, target]


def _default_keys() -> list[str]:
    return [p for p in (os.path.expanduser(f"~/.ssh/{k}") for k in DEFAULT_KEYS)
            if os.path.isfile(p)]


def has_identity(hop: Hop) -> bool:
    """Whether anything could authenticate `hop`: a key file named, an agent, a default key
    (the inventory requires `key_file` only when none of them is there)."""
    return bool(hop.key_files or os.environ.get("SSH_AUTH_SOCK") or _default_keys())


def _key_state(path: str) -> str:
    """ok | encrypted | missing | invalid, for a private key file."""
    if not os.path.isfile(path):
        return "missing"
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            cls.from_private_key_file(path)
            return "ok"
        except paramiko.PasswordRequiredException:
            return "encrypted"
        except (paramiko.SSHException, ValueError, OSError):
            continue                                   # another key type
    return "invalid"


def _keys(hop: Hop) -> tuple[list[str], str | None]:
    """(key files paramiko can use, why the others cannot be, if so). Nothing is refused before
    the host is reached: the agent may still log in, and a dead host is `unreachable` first.
    A missing config IdentityFile is skipped, as OpenSSH does; the inventory's is named."""
    usable, why = [], None
    for f in hop.key_files or _default_keys():
        state = _key_state(f)
        if state == "ok":
            usable.append(f)
        elif state == "encrypted":
            why = why or (f"key file {f} is encrypted and no ssh-agent holds it: load it into "
                          f"ssh-agent (ssh-add {f})")
        elif hop.key_file_given:
            why = f"key file {f} " + ("not found" if state == "missing" else
                                      "is not a private key paramiko can read")
    return (usable if hop.key_files else []), why


def _failure(e: Exception, hop: Hop, client: paramiko.SSHClient, t: float, prefix: str,
             unusable: str | None) -> DeviceError:
    """The typed, one-line DeviceError for paramiko's exception `e` on `hop`."""
    addr = f"{hop.hostname}:{hop.port}"
    no_methods = isinstance(e, paramiko.SSHException) and "No authentication methods" in str(e)
    if isinstance(e, paramiko.BadHostKeyException):
        return DeviceError("hostkey", f"{prefix}host key of {addr} CHANGED (does not match "
                           "known_hosts): refused")
    if unusable and (isinstance(e, paramiko.AuthenticationException) or no_methods):
        return DeviceError("auth", f"{prefix}{unusable}")
    if isinstance(e, paramiko.AuthenticationException):
        return DeviceError("auth", f"{prefix}key authentication as {hop.user!r} on {addr} "
                           f"failed: {e}")
    if no_methods:
        return DeviceError("auth", f"{prefix}no key to offer {hop}: give key_file, an "
                           "IdentityFile in ssh_config, or load a key into ssh-agent")
    if isinstance(e, paramiko.SSHException):
        if "known_hosts" in str(e):
            return DeviceError("hostkey", f"{prefix}host {addr} is not in known_hosts: refused")
        if not getattr(client.get_transport(), "remote_version", ""):   # a mute host
            return DeviceError("unreachable", f"{prefix}{addr} sent no SSH banner within "
                               f"{t:g} s")
        return DeviceError("unreachable", f"{prefix}SSH handshake with {addr} failed: {e}")
    if isinstance(e, TimeoutError):
        return DeviceError("timeout", f"{prefix}connecting to {addr} timed out after {t:.0f} s")
    return DeviceError("unreachable", f"{prefix}cannot reach {addr}: {e}")


def _connect_hop(hop: Hop, known_hosts: str, t: float, sock, prefix: str) -> paramiko.SSHClient:
    """A client authenticated on `hop` (over `sock`, a channel of the hop before, if any)."""
    usable, unusable = _keys(hop)
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(known_hosts)
    except OSError as e:
        raise DeviceError("hostkey", f"{prefix}known_hosts {known_hosts} unreadable "
                          f"({e.strerror}); host keys are always verified") from e
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(hop.hostname, hop.port, username=hop.user, key_filename=usable or None,
                       sock=sock, timeout=t, banner_timeout=t, auth_timeout=t,
                       channel_timeout=t, allow_agent=True, look_for_keys=not hop.key_files)
        return client
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise _failure(e, hop, client, t, prefix, unusable) from e
    finally:
        if client.get_transport() is None or not client.get_transport().is_active():
            client.close()


@dataclass
class Route:
    """The connected hops: one client per hop, jumps first; `client` is the target's."""
    hops: list[Hop]
    clients: list[paramiko.SSHClient]

    @property
    def client(self) -> paramiko.SSHClient:
        return self.clients[-1]

    def active(self) -> bool:
        return all(c.get_transport() is not None and c.get_transport().is_active()
                   for c in self.clients)

    def __str__(self) -> str:
        """`user@target:port via user@jump:port -> …`: the hops actually used, in order."""
        via = " -> ".join(map(str, self.hops[:-1]))
        return f"{self.hops[-1]} via {via}" if via else str(self.hops[-1])

    def close(self):
        for c in reversed(self.clients):    # the target first: its channel rides the jump
            c.close()


def connect(hops: list[Hop], known_hosts: str, timeout: float, name: str) -> Route:
    """Connect hop by hop, each next one through a direct-tcpip channel of the one before;
    on any failure the hops already connected are closed."""
    clients: list[paramiko.SSHClient] = []
    try:
        for i, hop in enumerate(hops):
            sock = None
            if i:
                before = hops[i - 1]
                try:
                    sock = clients[-1].get_transport().open_channel(
                        "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                        timeout=timeout)
                except (paramiko.SSHException, OSError, EOFError) as e:
                    raise DeviceError("unreachable", f"{name}: via {before.alias}: cannot reach "
                                      f"{hop.hostname}:{hop.port} from there: {e}") from e
            where = f"via {hop.alias}: " if i < len(hops) - 1 else ""
            clients.append(_connect_hop(hop, known_hosts, timeout, sock, f"{name}: {where}"))
        return Route(hops, clients)
    except BaseException:
        for c in reversed(clients):
            c.close()
        raise
