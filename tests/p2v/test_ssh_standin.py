"""p2v.ssh against the stand-in's real sshd (no Celery, no database)."""

from __future__ import annotations

import threading

import paramiko
import pytest

from p2v import ssh

pytestmark = [pytest.mark.standin]


def endpoint(standin, **changes) -> ssh.Endpoint:
    values = {
        "address": standin.address,
        "port": standin.port,
        "user": standin.user,
        "private_key": standin.private_key,
        "host_key_fingerprint": standin.host_key_fingerprint,
    }
    return ssh.Endpoint(**{**values, **changes})


def test_mismatch_raises_before_paramiko_authenticates(standin_machine, monkeypatch):
    attempts = []
    for name in ("auth_publickey", "auth_none", "auth_password", "auth_interactive"):
        original = getattr(paramiko.Transport, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            attempts.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(paramiko.Transport, name, spy)
    with ssh.connect(endpoint(standin_machine)) as session:  # control: a pinned, matching key authenticates
        assert session.run("echo ok").stdout == "ok\n"
    assert attempts == ["auth_publickey"]
    attempts.clear()
    with pytest.raises(ssh.HostKeyMismatch) as caught:
        ssh.connect(endpoint(standin_machine, host_key_fingerprint="SHA256:" + "B" * 43))
    assert caught.value.presented == standin_machine.host_key_fingerprint
    assert attempts == []


def test_session_settings_and_bounded_commands(standin_machine):
    with ssh.connect(endpoint(standin_machine)) as session:
        packetizer = session.transport.packetizer
        assert packetizer.REKEY_BYTES >= 2**40  # paramiko never starts a rekey (the server may)
        assert packetizer.REKEY_PACKETS >= 2**40
        assert [o.stdout for o in session.run_many(["echo a", "sleep 0.3; echo b", "echo c"])] == [
            "a\n",
            "b\n",
            "c\n",
        ]
        result = session.run("echo out; echo err >&2; exit 3")
        assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
        # Had the deadline not fired, run() would return normally after 30 s and pytest.raises
        # would fail: the exception itself proves it, no wall-clock threshold needed.
        with pytest.raises(ssh.CommandTimeout, match=r"`sleep 30` did not finish within 0\.5 s"):
            session.run("sleep 30", timeout_s=0.5)
        assert session.run("echo still usable").exit_status == 0


def test_killed_sshd_ends_a_running_command_with_connection_lost(standin_machine):
    try:
        with ssh.connect(endpoint(standin_machine)) as session:
            killer = threading.Timer(0.5, standin_machine.stop_sshd)
            killer.start()
            with pytest.raises(ssh.ConnectionLost, match="sleep 20"):
                session.run("sleep 20", timeout_s=15)
            killer.join()
        with pytest.raises(ssh.HostUnreachable, match="Connection refused"):
            ssh.connect(endpoint(standin_machine), connect_timeout_s=2)
    finally:
        standin_machine.start_sshd()
    with ssh.connect(endpoint(standin_machine)) as session:
        assert session.run("true").exit_status == 0


def test_command_killed_by_a_signal_is_not_a_lost_connection(standin_machine):
    with ssh.connect(endpoint(standin_machine)) as session:
        result = session.run("kill -TERM $$")
        assert result.exit_status == ssh.NO_EXIT_STATUS
        assert session.run("echo alive").stdout == "alive\n"


def test_admin_may_pin_any_of_the_servers_host_keys(standin_machine):
    """sshd holds Ed25519 and RSA host keys; paramiko is shown Ed25519 first. A pinned RSA
    fingerprint is no mismatch: the session is made with the RSA key, still checked before auth."""
    rsa = standin_machine.rsa_host_key_fingerprint
    assert rsa.startswith("SHA256:")
    assert rsa != standin_machine.host_key_fingerprint
    with ssh.connect(endpoint(standin_machine, host_key_fingerprint=rsa)) as session:
        assert session.host_key_fingerprint == rsa
        assert session.transport.get_remote_server_key().get_name() == "ssh-rsa"
        assert session.run("echo ok").stdout == "ok\n"
    with ssh.connect(endpoint(standin_machine, host_key_fingerprint=None)) as session:
        assert session.host_key_fingerprint == standin_machine.host_key_fingerprint  # first contact: Ed25519
