"""Credentials at rest and SSH identity helpers (no network)."""

from __future__ import annotations

import subprocess

import paramiko
import pytest

from p2v import ssh
from p2v.credentials import CredentialError

from .helpers import ed25519_key_pair, make_machine


@pytest.mark.django_db
def test_private_key_is_encrypted_at_rest_and_round_trips():
    private, public = ed25519_key_pair()
    machine = make_machine()
    stored = type(machine).objects.values_list("credential_ciphertext", flat=True).get(pk=machine.pk)
    body = private.splitlines()[1]
    assert body not in stored
    assert "PRIVATE KEY" not in stored
    assert machine.private_key() == private
    assert machine.credential_public_key == " ".join(public.split()[:2])


@pytest.mark.django_db
def test_another_credential_key_cannot_decrypt(monkeypatch):
    machine = make_machine()
    monkeypatch.setenv("P2V_CREDENTIAL_KEY", "a different key")
    with pytest.raises(CredentialError, match="cannot be decrypted with the current key"):
        machine.private_key()


def test_fingerprint_matches_ssh_keygen(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "h")], check=True)
    expected = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "h.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    key = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "h"))
    assert ssh.fingerprint_of(key) == expected
    assert ssh.normalize_fingerprint(expected + "=") == expected


@pytest.mark.parametrize("bad", ["", "MD5:aa:bb", "SHA256:short", "sha256:" + "A" * 43, "SHA256:" + "!" * 43])
def test_bad_fingerprints_are_refused_with_the_format(bad):
    with pytest.raises(ValueError, match="SHA256:' followed by 43 base64"):
        ssh.normalize_fingerprint(bad)


def test_unusable_private_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not an OpenSSH or PEM private key"):
        ssh.load_private_key("-----BEGIN NONSENSE-----\nabc\n-----END NONSENSE-----\n")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(tmp_path / "p")], check=True
    )
    with pytest.raises(ValueError, match="passphrase-protected"):
        ssh.load_private_key((tmp_path / "p").read_text())


def test_policy_refuses_a_different_key_and_pins_a_new_one():
    key = paramiko.Ed25519Key.from_private_key(__import__("io").StringIO(ed25519_key_pair()[0]))
    fingerprint = ssh.fingerprint_of(key)
    first_contact = ssh.PinnedHostKeyPolicy("10.0.0.1", 22, None)
    first_contact.missing_host_key(paramiko.SSHClient(), "10.0.0.1", key)
    assert first_contact.observed == fingerprint
    pinned = ssh.PinnedHostKeyPolicy("10.0.0.1", 2222, "SHA256:" + "A" * 43)
    with pytest.raises(ssh.HostKeyMismatch, match=r"10\.0\.0\.1:2222 changed") as caught:
        pinned.missing_host_key(paramiko.SSHClient(), "[10.0.0.1]:2222", key)
    assert caught.value.presented == fingerprint
