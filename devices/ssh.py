"""A remote device over SSH (paramiko), the TVM RPC runner's loop: upload -> run -> fetch ->
remove in `finally`, every failure typed.

The route is resolved as OpenSSH would (`ssh_route`): `~/.ssh/config` (Host aliases, HostName,
User, Port, IdentityFile, ProxyJump; the inventory's values win), keys from `key_file` or the
config, ssh-agent, the default `~/.ssh/id_*`; a jump host (bastion) or a chain of them, each
hop reached through the one before. Host keys are always verified, on every hop, against
`known_hosts` (RejectPolicy: an unknown key is refused, a changed one is a `hostkey` failure);
only key authentication. Facts record the route taken. Connecting is retried with backoff
when a hop is unreachable, never a command (a run is not idempotent). Artifacts go
to `<workdir>/cache/<sha256>` over SFTP, are checked by hash on the device, reused across runs
and evicted oldest-first beyond `cache_max_mb`. Each run gets `<workdir>/sessions/<token>`
with the agent bundle, removed in `finally`; a `<workdir>/lock` directory serialises runs.
Every path or name from a config reaches the remote shell through `shlex.quote`.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import stat
import time
import uuid
from contextlib import contextmanager

import paramiko

from hilq.measurement import Measurement, Protocol

from . import bundle, interrupt, ssh_route
from .errors import DeviceError
from .lock import dir_lock

# One remote process per run prepares the workdir and hashes the cached artifact, if any
# (each remote command costs a login-shell start, ~0.3 s).
_PREPARE = """import hashlib, os, sys
for d in sys.argv[2:]:
    os.makedirs(d, exist_ok=True)
h = hashlib.sha256()
try:
    with open(sys.argv[1], 'rb') as f:
        for c in iter(lambda: f.read(1 << 20), b''):
            h.update(c)
    print(h.hexdigest())
except FileNotFoundError:
    print('')
"""


class _SFTPFS:
    """`lock.dir_lock`'s file system over SFTP."""

    def __init__(self, sftp: paramiko.SFTPClient, rm):
        self.sftp, self.rm = sftp, rm

    def mkdir(self, path: str) -> bool:
        try:
            self.sftp.mkdir(path)
            return True
        except OSError:
            self.sftp.stat(path)  # exists -> False; parent missing -> raises
            return False

    def write(self, path: str, text: str):
        self.sftp.putfo(io.BytesIO(text.encode()), path)

    def read(self, path: str) -> str | None:
        try:
            with self.sftp.open(path) as f:
                return f.read().decode()
        except OSError:
            return None

    def rename(self, a: str, b: str) -> bool:
        try:
            self.sftp.rename(a, b)
            return True
        except OSError:
            return False

    def rmtree(self, path: str):
        self.rm(path)


class SSHDevice:
    kind = "ssh"

    def __init__(self, name: str, host: str, user: str | None = None,
                 key_file: str | None = None, known_hosts: str = "~/.ssh/known_hosts",
                 port: int | None = None, ssh_config: str | None = None, jump: str | None = None,
                 python: str = "python3", workdir: str = "/tmp/hilq", runtimes=("ort",),
                 power: str = "none", connect_timeout_s: float = 10.0,
                 command_timeout_s: float | None = None, retries: int = 3,
                 backoff_s: float = 0.5, cache_max_mb: float = 2048, lock_wait_s: float = 3600):
        try:
            self.hops = ssh_route.resolve(host, port, user, key_file, jump, ssh_config)
        except DeviceError as e:
            raise DeviceError(e.kind, f"{name}: {e}") from None
        self.name, self.host = name, host
        self.port, self.user = self.hops[-1].port, self.hops[-1].user
        self.key_file = os.path.expanduser(key_file) if key_file else None
        self.known_hosts = os.path.expanduser(known_hosts)
        self.python, self.workdir = python, workdir.rstrip("/") or "/"
        self.runtimes, self.power = tuple(runtimes), power
        self.connect_timeout_s, self.command_timeout_s = connect_timeout_s, command_timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.cache_max_bytes = int(cache_max_mb * 2**20)
        self.lock_wait_s = lock_wait_s
        self._route: ssh_route.Route | None = None
        self._facts: dict | None = None

    # --- connection -----------------------------------------------------------------------

    def _connect_once(self) -> ssh_route.Route:
        return ssh_route.connect(self.hops, self.known_hosts, self.connect_timeout_s, self.name)

    @property
    def _client(self) -> paramiko.SSHClient | None:
        return self._route.client if self._route is not None else None

    def connect(self) -> paramiko.SSHClient:
        """The live connection, (re)connecting with backoff on unreachable/timeout only."""
        if self._route is not None and self._route.active():
            return self._route.client
        self.close()
        for attempt in range(self.retries):
            try:
                self._route = self._connect_once()
                return self._route.client
            except DeviceError as e:
                if e.kind not in ("unreachable", "timeout") or attempt == self.retries - 1:
                    raise
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable code")

    def close(self):
        if self._route is not None:
            self._route.close()             # the target, then its jump hosts
            self._route = None

    # --- remote commands ------------------------------------------------------------------

    def _exec(self, argv: list[str], timeout: float, cwd: str | None = None,
              pidfile: str | None = None) -> tuple[int, str, str]:
        """Run argv (each word quoted) remotely; (exit status, stdout, stderr). The transport
        dying is `unreachable`; the deadline passing kills the remote process group."""
        cmd = " ".join(shlex.quote(a) for a in argv)
        if pidfile:  # the shell's pid becomes the agent's after exec: its process group
            cmd = f"echo $$ > {shlex.quote(pidfile)} && exec {cmd}"
        if cwd:
            cmd = f"cd {shlex.quote(cwd)} && {cmd}"
        transport = self.connect().get_transport()
        try:
            chan = transport.open_session(timeout=self.connect_timeout_s)
            chan.exec_command(cmd)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise DeviceError("unreachable", f"{self.name}: cannot start a command: {e}") from e
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                busy = False
                if chan.recv_ready():
                    out += chan.recv(65536)
                    busy = True
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    busy = True
                if chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready():
                    break
                if not transport.is_active():
                    raise DeviceError("unreachable", f"{self.name}: connection lost during "
                                      f"the run ({' '.join(argv[:2])})")
                if pidfile:
                    interrupt.check()         # hilq is stopping: so is the agent (below)
                if time.monotonic() > deadline:
                    chan.close()
                    if pidfile and not self._kill(pidfile):
                        # the host cannot be reached (a silent partition keeps the transport
                        # "active"): drop it, so nothing else waits on it; the agent's own
                        # --deadline-s ends it there
                        self.close()
                    raise DeviceError("timeout", f"{self.name}: command ran past {timeout:.0f} s")
                if not busy:
                    time.sleep(0.01)
            status = chan.recv_exit_status()
            if status == -1:  # channel closed without an exit status: the connection died
                raise DeviceError("unreachable", f"{self.name}: connection lost during the "
                                  f"run ({' '.join(argv[:2])})")
            return status, out.decode(errors="replace"), err.decode(errors="replace")
        except KeyboardInterrupt:     # Ctrl-C, SIGTERM (interrupt.Interrupted): no orphan
            chan.close()
            if pidfile:
                self._kill(pidfile)
            raise
        finally:
            chan.close()

    def _kill(self, pidfile: str) -> bool:
        """Kill the process group in `pidfile`; False when the host could not be reached."""
        try:
            q = shlex.quote(pidfile)
            self._exec(["sh", "-c", f"kill -KILL -- -$(cat {q}) 2>/dev/null; "
                        f"kill -KILL $(cat {q}) 2>/dev/null; true"], 10)
            return True
        except DeviceError:
            return False

    def _rm(self, path: str, sftp: paramiko.SFTPClient | None = None):
        """Remove a tree: over SFTP when a session is open (no process start), else rm -rf."""
        if sftp is None:
            self._exec(["rm", "-rf", "--", path], 60)
            return
        try:
            entries = sftp.listdir_attr(path)
        except OSError:
            return
        for a in entries:
            p = f"{path}/{a.filename}"
            if stat.S_ISDIR(a.st_mode or 0):
                self._rm(p, sftp)
            else:
                sftp.remove(p)
        sftp.rmdir(path)

    # --- upload ---------------------------------------------------------------------------

    def _hash(self, path: str, *mkdirs: str) -> str | None:
        rc, out, _ = self._exec([self.python, "-c", _PREPARE, path, *mkdirs], 120)
        return out.strip() if rc == 0 else None

    def _cached(self, sftp: paramiko.SFTPClient, artifact) -> str:
        """`<workdir>/cache/<sha256>` holding the artifact (and its manifest), checked by hash
        on the device, uploaded only when missing or corrupt."""
        cache = f"{self.workdir}/cache"
        remote = f"{cache}/{artifact.sha256}"
        if self._hash(remote, cache) == artifact.sha256:
            sftp.utime(remote, None)  # most recently used, last to be evicted
        else:
            part = f"{remote}.part-{uuid.uuid4().hex}"
            sftp.put(artifact.path, part)
            if self._hash(part) != artifact.sha256:
                self._rm(part, sftp)
                raise DeviceError("unreachable", f"{self.name}: upload of {artifact.path} "
                                  "arrived corrupted (sha256 mismatch)")
            sftp.posix_rename(part, remote)
        sftp.put(str(artifact.manifest_path), f"{remote}.manifest.json")
        self._evict(sftp, cache, keep=artifact.sha256)
        return remote

    def _evict(self, sftp: paramiko.SFTPClient, cache: str, keep: str):
        entries = []
        for a in sftp.listdir_attr(cache):
            if ".part-" in a.filename:  # an upload cut short (we hold the lock: not in flight)
                sftp.remove(f"{cache}/{a.filename}")
            elif stat.S_ISREG(a.st_mode or 0):
                entries.append(a)
        total = sum(a.st_size for a in entries)
        artifacts = sorted((a for a in entries if "." not in a.filename), key=lambda a: a.st_mtime)
        for a in artifacts:
            if total <= self.cache_max_bytes:
                break
            if a.filename == keep:
                continue
            for name in (a.filename, f"{a.filename}.manifest.json"):
                try:
                    total -= sftp.stat(f"{cache}/{name}").st_size
                    sftp.remove(f"{cache}/{name}")
                except OSError:
                    pass

    @contextmanager
    def _session(self, sftp: paramiko.SFTPClient, ttl_s: float, wait_s: float | None = None):
        """Hold the device lock; clear sessions left by dead runs; yield a fresh session dir
        with the agent bundle, removed in `finally`."""
        sessions = f"{self.workdir}/sessions"
        try:
            sftp.stat(sessions)
        except OSError:
            self._exec(["mkdir", "-p", "--", sessions], 30)
        rm = lambda p: self._rm(p, sftp)  # noqa: E731
        with dir_lock(_SFTPFS(sftp, rm), f"{self.workdir}/lock", ttl_s,
                      self.lock_wait_s if wait_s is None else wait_s):
            for old in sftp.listdir(sessions):  # we hold the lock: any other session is stale
                self._rm(f"{sessions}/{old}", sftp)
            tmp = f"{sessions}/{uuid.uuid4().hex}"
            try:
                sftp.mkdir(tmp)
                sftp.mkdir(f"{tmp}/runtimes")
                for src, rel in bundle.files():
                    sftp.put(str(src), f"{tmp}/{rel}")
                yield tmp
            finally:
                try:
                    self._rm(tmp, sftp)
                except (OSError, EOFError, paramiko.SSHException):
                    pass  # connection gone: the next run clears it

    # --- the Device methods ---------------------------------------------------------------

    def facts(self) -> dict:
        if self._facts is None:
            with self.connect().open_sftp() as sftp, self._session(sftp, 120, wait_s=60) as tmp:
                route = str(self._route)
                rc, out, err = self._exec([self.python, "agent.py", "--facts", "--runtimes",
                                           ",".join(self.runtimes)], 60, cwd=tmp)
            try:
                self._facts = {"device": self.name, "kind": self.kind, "host": self.host,
                               "route": route, **json.loads(out)}
            except ValueError as e:
                raise DeviceError("agent_crash", f"{self.name}: agent --facts failed (exit "
                                  f"{rc}): {err.strip()[-300:]}") from e
        return self._facts

    def run(self, artifact, protocol: Protocol, runtime: str = "ort", reference: str | None = None,
            rtol: float = 1e-3, atol: float = 1e-4, evalset=None) -> Measurement:
        """Time `artifact` on the device, then evaluate it over `evalset` (an Artifact, cached
        by sha256 like artifacts: uploaded once); typed failures come back as a failed
        Measurement."""
        ident, protocol, timeout = bundle.prepare(artifact, self.name, runtime, protocol,
                                                  self.power, self.command_timeout_s)
        try:
            with self.connect().open_sftp() as sftp:
                sftp.get_channel().settimeout(max(30.0, 3 * self.connect_timeout_s))  # no hangs
                with self._session(sftp, timeout + 300) as tmp:
                    remote = self._cached(sftp, artifact)
                    sftp.putfo(io.BytesIO(json.dumps(protocol.to_dict()).encode()),
                               f"{tmp}/protocol.json")
                    ref = None
                    if reference:
                        ref = f"{tmp}/reference.npz"
                        sftp.put(reference, ref)
                    ev = self._cached(sftp, evalset) if evalset is not None else None
                    args = bundle.agent_args(remote, "protocol.json", runtime, ref, rtol, atol,
                                             ev, timeout)
                    rc, out, err = self._exec([self.python, *args], timeout, cwd=tmp,
                                              pidfile=f"{tmp}/agent.pid")
        except DeviceError as e:
            return Measurement.failed(**ident, failure=e.kind, reason=str(e),
                                      protocol=protocol.to_dict())
        except (paramiko.SSHException, OSError, EOFError) as e:
            alive = self._client is not None and self._client.get_transport() is not None \
                and self._client.get_transport().is_active()
            kind = "timeout" if isinstance(e, TimeoutError) else \
                "runtime_error" if alive else "unreachable"
            return Measurement.failed(**ident, failure=kind, reason=f"{self.name}: "
                                      f"{type(e).__name__}: {e}", protocol=protocol.to_dict())
        return bundle.to_measurement(rc, out, err, protocol=protocol, **ident)
