"""SSH to physical machines: pinned host keys checked before any credential leaves, bounded commands.

The host key is checked by `PinnedHostKeyPolicy`, which paramiko calls after the key exchange and
before authentication (we give the client an empty known-hosts store, so it is called on every
connection). A machine without a pinned key is pinned on first contact; a key that differs from
the pinned fingerprint raises `HostKeyMismatch` and the connection is closed with no
authentication attempted. Only the machine's own key is offered (no agent, no ~/.ssh keys).

Every command has a deadline; the session raises `CommandTimeout` naming the command when it
passes. Paramiko's own rekeying after 512 MiB is disabled (the server still rekeys): paramiko's
client-initiated rekey kills long disk transfers ("Key-exchange timed out", PLATFORM-NOTES).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import os
import re
import shlex
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import paramiko

from .facts import PROBE_TIMEOUTS_S, CommandOutput

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_COMMAND_TIMEOUT_S = 30.0
MAX_OUTPUT_BYTES = 32 * 1024 * 1024
NO_EXIT_STATUS = -1  # paramiko's Channel.exit_status until the server sends one
PARALLEL_CHANNELS = 4  # sshd allows 10 sessions per connection by default (MaxSessions)
REKEY_LIMIT = 2**40  # bytes and packets: effectively "never" from our side
FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
KEY_CLASSES: tuple[type[paramiko.PKey], ...] = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


class SSHError(Exception):
    """Talking to the machine failed; str(error) is the reason shown to the admin."""


class HostUnreachable(SSHError):
    pass


class HostKeyMismatch(SSHError):
    def __init__(self, address: str, port: int, expected: str, presented: str) -> None:
        super().__init__(
            f"host key of {address}:{port} changed: pinned {expected}, presented {presented}; "
            "refused before authentication (no credential sent)"
        )
        self.address, self.port = address, port
        self.expected, self.presented = expected, presented


class AuthenticationRejected(SSHError):
    pass


class CommandTimeout(SSHError):
    def __init__(self, command: str, timeout_s: float) -> None:
        super().__init__(f"`{command}` did not finish within {timeout_s:g} s")
        self.command, self.timeout_s = command, timeout_s


class ConnectionLost(SSHError):
    pass


class PrivilegeUnavailable(SSHError):
    """The login user is not root and sudo works neither without a password nor with the stored one."""


PRIVILEGE_ROOT = "root"
PRIVILEGE_SUDO = "sudo"  # sudo -n: NOPASSWD
PRIVILEGE_SUDO_PASSWORD = "sudo-password"  # noqa: S105 (a mode name, not a password): sudo -S with the stored (encrypted) sudo password


@dataclass(frozen=True)
class Privilege:
    """How commands get root on the source: as root itself, or through sudo (with or without a password).

    `wrap` builds the command line; `stdin` is what the command must be fed first (the password
    for `sudo -S`, never on the command line, so it shows in no process list or log)."""

    via: str
    password: str | None = None

    def wrap(self, command: str) -> str:
        if self.via == PRIVILEGE_ROOT:
            return command
        inner = shlex.quote(command)
        if self.via == PRIVILEGE_SUDO:
            return f"sudo -n -- sh -c {inner}"
        if self.via == PRIVILEGE_SUDO_PASSWORD:
            return f"sudo -S -p '' -- sh -c {inner}"
        raise ValueError(f"unknown privilege {self.via!r}: expected root, sudo or sudo-password")

    def stdin(self) -> bytes | None:
        if self.via == PRIVILEGE_SUDO_PASSWORD:
            return (self.password or "").encode() + b"\n"
        return None

    def __repr__(self) -> str:  # never the password
        return f"Privilege(via={self.via!r})"


def fingerprint_of(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint (`ssh-keygen -lf`): 'SHA256:' + unpadded base64 of the blob's hash."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def normalize_fingerprint(value: str) -> str:
    """Validate an admin-supplied fingerprint ('SHA256:<43 base64 chars>', padding optional)."""
    text = (value or "").strip().rstrip("=")
    if not FINGERPRINT_RE.fullmatch(text):
        raise ValueError(
            f"host key fingerprint must look like 'SHA256:' followed by 43 base64 characters "
            f"(as `ssh-keygen -lf` prints it), got {value!r}"
        )
    return text


def load_private_key(text: str) -> paramiko.PKey:
    """Parse an unencrypted OpenSSH/PEM private key (Ed25519, ECDSA or RSA)."""
    for cls in KEY_CLASSES:
        try:
            return cls.from_private_key(io.StringIO(text))
        except paramiko.PasswordRequiredException:
            raise ValueError("the private key is passphrase-protected; supply an unencrypted key") from None
        except Exception:  # noqa: S112  (any parse failure means "not this key type")
            continue
    raise ValueError("not an OpenSSH or PEM private key (Ed25519, ECDSA or RSA)")


def public_key_line(key: paramiko.PKey, comment: str = "") -> str:
    return f"{key.get_name()} {key.get_base64()}" + (f" {comment}" if comment else "")


class PinnedHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Accept the host key only if it matches the pinned fingerprint; pin it on first contact."""

    def __init__(self, address: str, port: int, expected_fingerprint: str | None) -> None:
        self.address, self.port = address, port
        self.expected = expected_fingerprint or None
        self.observed: str | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.observed = fingerprint_of(key)
        if self.expected is not None and self.observed != self.expected:
            raise HostKeyMismatch(self.address, self.port, self.expected, self.observed)


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int
    user: str
    private_key: str
    host_key_fingerprint: str | None = None
    # A network namespace to connect from (the verify stage reaches a converted VM on an isolated
    # network that only a namespace of its own can see); None: this process's network.
    netns: str | None = None
    # For a login user other than root: the sudo password, decrypted only for this connection.
    sudo_password: str | None = dataclasses.field(default=None, repr=False)


def open_socket(endpoint: Endpoint, timeout_s: float) -> socket.socket:
    """A TCP connection to the endpoint, made inside `endpoint.netns` when one is given."""
    if endpoint.netns is None:
        return socket.create_connection((endpoint.address, endpoint.port), timeout=timeout_s)
    return _socket_in_netns(endpoint.netns, endpoint.address, endpoint.port, timeout_s)


def _socket_in_netns(netns: str, address: str, port: int, timeout_s: float) -> socket.socket:
    """setns(2) applies to the calling thread only: a short-lived thread enters the namespace and
    connects; the socket stays in that namespace after the thread ends, and no other thread moves."""
    import ctypes
    import threading

    result: dict[str, object] = {}

    def connect_inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{netns}") as handle:
                if libc.setns(handle.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into network namespace {netns!r}: {os.strerror(errno)}")
            result["socket"] = socket.create_connection((address, port), timeout=timeout_s)
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=connect_inside, name=f"p2v-netns-{netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["socket"]  # type: ignore[return-value]


class SSHSession:
    """An authenticated connection; `run` executes one bounded command."""

    def __init__(
        self, client: paramiko.SSHClient, endpoint: Endpoint, host_key_fingerprint: str, pinned_now: bool
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.host_key_fingerprint = host_key_fingerprint
        self.pinned_now = pinned_now
        # Root (or sudo) for every command once `acquire_privilege` found a way; None: as the user.
        self.privilege: Privilege | None = None

    def acquire_privilege(self) -> Privilege:
        """Find how this login gets root: root itself, `sudo -n`, or `sudo -S` with the stored
        password; every later `run` goes through it. PrivilegeUnavailable says why none works."""
        user = self.endpoint.user
        if user == "root":
            self.privilege = Privilege(PRIVILEGE_ROOT)
            return self.privilege
        tried = []
        for privilege in (
            Privilege(PRIVILEGE_SUDO),
            *(
                [Privilege(PRIVILEGE_SUDO_PASSWORD, self.endpoint.sudo_password)]
                if self.endpoint.sudo_password
                else []
            ),
        ):
            out = self._exec(privilege.wrap("id -u"), DEFAULT_COMMAND_TIMEOUT_S, privilege.stdin(), "id -u")
            if out.exit_status == 0 and out.stdout.strip() == "0":
                self.privilege = privilege
                return privilege
            detail = (out.stderr.strip() or out.stdout.strip() or f"exit status {out.exit_status}")[:200]
            tried.append(f"{privilege.wrap('id -u')!s}: {detail}")
        if not self.endpoint.sudo_password:
            tried.append("no sudo password stored")
        raise PrivilegeUnavailable(
            f"{user!r} is not root and cannot become root through sudo ("
            + "; ".join(tried)
            + "): log in as root, allow the user NOPASSWD sudo, or store its sudo password"
        )

    @property
    def transport(self) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionLost(f"connection to {self.endpoint.address}:{self.endpoint.port} is closed")
        return transport

    def run(self, command: str, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S) -> CommandOutput:
        """Run `command` under a POSIX shell with LC_ALL=C (through sudo when the session acquired it
        that way); raise CommandTimeout past `timeout_s` (or the probe's own longer limit,
        facts.PROBE_TIMEOUTS_S)."""
        timeout_s = max(timeout_s, PROBE_TIMEOUTS_S.get(command, 0))
        line = f"LC_ALL=C; export LC_ALL; {command}"
        privilege = self.privilege
        if privilege is not None and privilege.via != PRIVILEGE_ROOT:
            return self._exec(privilege.wrap(line), timeout_s, privilege.stdin(), command)
        return self._exec(line, timeout_s, None, command)

    def _exec(
        self, line: str, timeout_s: float, stdin: bytes | None, command: str | None = None
    ) -> CommandOutput:
        """Run one command line on a new channel; `command` (default: the line) names it in errors."""
        command = command or line
        deadline = time.monotonic() + timeout_s
        try:
            channel = self.transport.open_session(timeout=timeout_s)
            channel.exec_command(line)
            if stdin is not None:
                channel.sendall(stdin)
                channel.shutdown_write()
        except (paramiko.SSHException, OSError) as exc:
            raise ConnectionLost(f"could not start `{command}`: {exc}") from exc
        stdout, stderr = bytearray(), bytearray()
        try:
            while True:
                progressed = False
                while channel.recv_ready():
                    stdout += channel.recv(65536)
                    progressed = True
                while channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(65536)
                    progressed = True
                if len(stdout) + len(stderr) > MAX_OUTPUT_BYTES:
                    raise SSHError(f"`{command}` printed more than {MAX_OUTPUT_BYTES} bytes")
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                    and (channel.eof_received or channel.closed)
                ):
                    break
                if time.monotonic() > deadline:
                    raise CommandTimeout(command, timeout_s)
                if not progressed:
                    time.sleep(0.005)
            status = channel.recv_exit_status()
        finally:
            channel.close()
        if status == NO_EXIT_STATUS:
            # Paramiko reports a closed channel as finished, with no exit status. Either the
            # connection died (no EOF came; paramiko closes channels before marking the transport
            # inactive), or the command was killed by a signal (sshd sends exit-signal, EOF, close).
            transport = self.client.get_transport()
            if not channel.eof_received or transport is None or not transport.is_active():
                where = f"{self.endpoint.address}:{self.endpoint.port}"
                raise ConnectionLost(f"connection to {where} closed while running `{command}`")
        return CommandOutput(
            command=command,
            exit_status=status,
            stdout=stdout.decode("utf-8", "replace"),
            stderr=stderr.decode("utf-8", "replace"),
        )

    def run_many(
        self,
        commands: list[str],
        timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        parallel: int = PARALLEL_CHANNELS,
    ) -> list[CommandOutput]:
        """Run independent commands on up to `parallel` channels at once; results in the given order.

        The first failure (in command order) is raised once every started command has ended.
        """
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="p2v-ssh") as pool:
            return list(pool.map(lambda command: self.run(command, timeout_s), commands))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Host-key families a server may hold one key of each (OpenSSH generates all three by default).
HOST_KEY_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("ssh-ed25519",),
    ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"),
    ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
)


def _only(family: tuple[str, ...]) -> dict[str, list[str]]:
    """paramiko's disabled_algorithms that leave only `family` as acceptable host-key types."""
    every = set(paramiko.Transport._preferred_keys) | {name for fam in HOST_KEY_FAMILIES for name in fam}
    return {"keys": sorted(every - set(family))}


def _family_presenting(endpoint: Endpoint, fingerprint: str, timeout_s: float) -> tuple[str, ...] | None:
    """Which host-key family of the server has `fingerprint`: key exchange only, never authentication.

    A server holding several host keys shows paramiko its Ed25519 key first; an admin may have
    pinned its RSA or ECDSA key instead. That is not a mismatch, so look at each family once.
    """
    for family in HOST_KEY_FAMILIES:
        try:
            with open_socket(endpoint, timeout_s) as sock:
                transport = paramiko.Transport(sock, disabled_algorithms=_only(family))
                try:
                    transport.banner_timeout = timeout_s
                    transport.start_client(timeout=timeout_s)
                    presented = fingerprint_of(transport.get_remote_server_key())
                finally:
                    transport.close()
        except (OSError, paramiko.SSHException, EOFError):
            continue  # the server has no key of this family (no common host-key algorithm)
        if presented == fingerprint:
            return family
    return None


def connect(
    endpoint: Endpoint, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, privileged: bool = True
) -> SSHSession:
    """Open an authenticated session, checking the host key before authenticating.

    privileged: every command runs as root (a non-root user through sudo, see
    SSHSession.acquire_privilege); PrivilegeUnavailable when that is impossible. False: commands
    run as the login user until the caller calls acquire_privilege itself."""
    try:
        pkey = load_private_key(endpoint.private_key)
    except ValueError as exc:
        raise AuthenticationRejected(f"the machine's credential is unusable: {exc}") from None
    try:
        session = _connect(endpoint, pkey, connect_timeout_s, disabled_algorithms=None)
    except HostKeyMismatch:
        family = _family_presenting(endpoint, endpoint.host_key_fingerprint or "", connect_timeout_s)
        if family is None:
            raise
        session = _connect(endpoint, pkey, connect_timeout_s, disabled_algorithms=_only(family))
    if privileged:
        try:
            session.acquire_privilege()
        except BaseException:
            session.close()
            raise
    return session


def _connect(
    endpoint: Endpoint, pkey: paramiko.PKey, connect_timeout_s: float, disabled_algorithms: dict | None
) -> SSHSession:
    policy = PinnedHostKeyPolicy(endpoint.address, endpoint.port, endpoint.host_key_fingerprint)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(policy)  # known-hosts store stays empty: policy sees every key
    where = f"{endpoint.address}:{endpoint.port}"
    try:
        sock = open_socket(endpoint, connect_timeout_s) if endpoint.netns else None
        client.connect(
            endpoint.address,
            sock=sock,
            port=endpoint.port,
            username=endpoint.user,
            pkey=pkey,
            allow_agent=False,
            look_for_keys=False,
            timeout=connect_timeout_s,
            banner_timeout=connect_timeout_s,
            auth_timeout=connect_timeout_s,
            disabled_algorithms=disabled_algorithms,
        )
    except HostKeyMismatch:
        client.close()
        raise
    except paramiko.AuthenticationException as exc:
        client.close()
        raise AuthenticationRejected(
            f"{endpoint.user}@{where} rejected the machine's key {fingerprint_of(pkey)} ({exc})"
        ) from None
    except TimeoutError as exc:
        client.close()
        raise HostUnreachable(f"cannot reach {where}: no answer within {connect_timeout_s:g} s") from exc
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        client.close()
        causes = "; ".join(sorted({err.strerror or str(err) for err in exc.errors.values()}))
        raise HostUnreachable(f"cannot reach {where}: {causes}") from exc
    except OSError as exc:
        client.close()
        raise HostUnreachable(f"cannot reach {where}: {exc.strerror or exc}") from exc
    except paramiko.SSHException as exc:
        client.close()
        raise HostUnreachable(f"no SSH service at {where}: {exc}") from exc
    transport = client.get_transport()
    assert transport is not None
    assert policy.observed is not None
    transport.packetizer.REKEY_BYTES = REKEY_LIMIT
    transport.packetizer.REKEY_PACKETS = REKEY_LIMIT
    transport.set_keepalive(15)
    return SSHSession(client, endpoint, policy.observed, pinned_now=endpoint.host_key_fingerprint is None)
