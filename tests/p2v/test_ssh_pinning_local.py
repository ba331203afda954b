"""Host-key pinning against a local paramiko SSH server on loopback: fast, no root, no namespace.

The stand-in machine's tests (test_ssh_standin.py) prove the same against a real sshd but need
root; these catch a `connect()` that stops passing the pinned fingerprint to its host-key policy
(it would then pin whatever key a server presents) on any machine. The server counts every
authentication attempt, so "refused before any credential was sent" is observed, not assumed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2v import ssh


@dataclass
class LocalServer:
    address: str
    port: int
    host_key: paramiko.PKey
    auth_attempts: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return ssh.fingerprint_of(self.host_key)


class _Interface(paramiko.ServerInterface):
    def __init__(self, server: LocalServer, client_key: paramiko.PKey):
        self.server, self.client_key = server, client_key

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        self.server.auth_attempts.append(username)
        if username == "root" and key.asbytes() == self.client_key.asbytes():
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        self.server.commands.append(command.decode())

        # Output, exit status and EOF, but no close: this runs while paramiko has yet to send the
        # exec request's success reply, and a close that overtakes it fails the client's
        # exec_command with "Channel closed". The client closes the channel when it is done.
        def answer():
            channel.sendall(b"pinned ok\n")
            channel.send_exit_status(0)
            channel.shutdown_write()

        threading.Thread(target=answer, daemon=True).start()
        return True


def _new_ed25519_openssh() -> str:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    return pem.decode()


@pytest.fixture(scope="module")
def client_key_text() -> str:
    return _new_ed25519_openssh()


@pytest.fixture(scope="module")
def client_key(client_key_text) -> paramiko.PKey:
    return ssh.load_private_key(client_key_text)


@pytest.fixture(scope="module")
def server(client_key) -> Iterator[LocalServer]:
    listener = socket.create_server(("127.0.0.1", 0))
    host_key = ssh.load_private_key(_new_ed25519_openssh())
    local = LocalServer("127.0.0.1", listener.getsockname()[1], host_key)
    transports: list[paramiko.Transport] = []
    stopping = threading.Event()

    def serve():
        while not stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(host_key)
            transports.append(transport)
            # start_server returns at once with an event: each connection negotiates on its own
            # thread, so a client that gives up mid key exchange never holds up the next one.
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                transport.start_server(event=threading.Event(), server=_Interface(local, client_key))

    thread = threading.Thread(target=serve, name="local-sshd", daemon=True)
    thread.start()
    yield local
    stopping.set()
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
    listener.close()
    for transport in transports:
        transport.close()
    thread.join(timeout=30)


def endpoint(server: LocalServer, key_text: str, pin: str | None) -> ssh.Endpoint:
    return ssh.Endpoint(address=server.address, port=server.port, user="root", private_key=key_text,
                        host_key_fingerprint=pin)


def test_a_matching_pin_connects_and_runs(server, client_key_text):
    with ssh.connect(endpoint(server, client_key_text, server.fingerprint), connect_timeout_s=60) as session:
        assert session.host_key_fingerprint == server.fingerprint
        assert session.pinned_now is False
        assert session.run("uname -a", timeout_s=60).stdout == "pinned ok\n"


def test_first_contact_pins_the_presented_key(server, client_key_text):
    with ssh.connect(endpoint(server, client_key_text, None), connect_timeout_s=60) as session:
        assert (session.host_key_fingerprint, session.pinned_now) == (server.fingerprint, True)


def test_a_different_pinned_key_is_refused_before_any_credential_is_sent(server, client_key_text):
    wrong = "SHA256:" + "A" * 43
    assert wrong != server.fingerprint
    server.auth_attempts.clear()
    with pytest.raises(ssh.HostKeyMismatch) as caught:
        ssh.connect(endpoint(server, client_key_text, wrong), connect_timeout_s=60)
    assert (caught.value.expected, caught.value.presented) == (wrong, server.fingerprint)
    assert str(caught.value).startswith(f"host key of 127.0.0.1:{server.port} changed")
    assert server.auth_attempts == []


@pytest.mark.django_db
def test_a_machines_pin_reaches_connect_through_an_assessment(server, client_key_text):
    """The machine row's pinned fingerprint is what `connect()` checks: an assessment of a machine
    pinned to another key fails with the mismatch, records it, and sends the server no credential.
    (A `Machine.endpoint()` that dropped the pin would pin whatever key the server presents.)"""
    from p2v.models import Assessment, AssessmentStatus, Machine, SecurityEvent
    from p2v.services import run_assessment

    wrong = "SHA256:" + "B" * 43
    machine = Machine(name="pinned-elsewhere", address=server.address, ssh_port=server.port, ssh_user="root",
                      host_key_fingerprint=wrong, connect_timeout_s=60)
    machine.set_private_key(client_key_text)
    machine.save()
    assessment = Assessment.objects.create(machine=machine)
    server.auth_attempts.clear()

    finished = run_assessment(assessment.pk)

    assert finished.status == AssessmentStatus.FAILED
    assert finished.error.startswith(f"host key of 127.0.0.1:{server.port} changed"), finished.error
    assert server.auth_attempts == []
    event = SecurityEvent.objects.get(machine=machine)
    assert (event.expected_fingerprint, event.presented_fingerprint) == (wrong, server.fingerprint)
    machine.refresh_from_db()
    assert machine.host_key_fingerprint == wrong  # the presented key was not pinned in its place
