"""P2V credential key rotation: MultiFernet decrypts with the current or an old key, and
`manage.py rotate_p2v_credentials` re-encrypts everything with the current key, all or nothing."""

from __future__ import annotations

import io

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.management import CommandError, call_command

from p2v.credentials import CredentialError, decrypt_secret, encrypt_secret, is_current
from p2v.models import Machine

pytestmark = pytest.mark.django_db


def _pem() -> str:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()


def _machine(name: str, pem: str) -> Machine:
    machine = Machine(name=name, address="192.0.2.50")
    machine.set_private_key(pem)
    machine.save()
    return machine


def _rotate(**kwargs) -> str:
    out = io.StringIO()
    call_command("rotate_p2v_credentials", stdout=out, **kwargs)
    return out.getvalue()


def test_rotation_reencrypts_with_the_new_key_and_the_old_key_can_go(monkeypatch):
    monkeypatch.setenv("P2V_CREDENTIAL_KEY", "first key")
    monkeypatch.delenv("P2V_CREDENTIAL_OLD_KEYS", raising=False)
    pems = {name: _pem() for name in ("m-a", "m-b")}
    for name, pem in pems.items():
        _machine(name, pem)
    before = dict(Machine.objects.values_list("name", "credential_ciphertext"))

    monkeypatch.setenv("P2V_CREDENTIAL_KEY", "second key")
    monkeypatch.setenv("P2V_CREDENTIAL_OLD_KEYS", "first key")
    assert Machine.objects.get(name="m-a").private_key() == pems["m-a"]  # old key still reads
    assert _rotate(dry_run=True).startswith("would re-encrypt 2 credential(s)")
    assert dict(Machine.objects.values_list("name", "credential_ciphertext")) == before  # dry run
    assert _rotate().startswith("re-encrypted 2 credential(s); 0 already use the current key")
    assert _rotate().startswith("re-encrypted 0 credential(s); 2 already use the current key")

    monkeypatch.delenv("P2V_CREDENTIAL_OLD_KEYS")  # the old key is gone: everything still reads
    for name, pem in pems.items():
        machine = Machine.objects.get(name=name)
        assert machine.credential_ciphertext != before[name]
        assert is_current(machine.credential_ciphertext)
        assert machine.private_key() == pem


def test_a_credential_no_key_opens_fails_the_whole_rotation_naming_it(monkeypatch):
    monkeypatch.setenv("P2V_CREDENTIAL_KEY", "lost key")
    monkeypatch.delenv("P2V_CREDENTIAL_OLD_KEYS", raising=False)
    _machine("m-lost", _pem())
    monkeypatch.setenv("P2V_CREDENTIAL_KEY", "old key")
    _machine("m-ok", _pem())
    before = dict(Machine.objects.values_list("name", "credential_ciphertext"))
    monkeypatch.setenv("P2V_CREDENTIAL_KEY", "new key")
    monkeypatch.setenv("P2V_CREDENTIAL_OLD_KEYS", "old key")
    expected = r"1 credential\(s\) cannot be decrypted .*: m-lost;.*nothing was changed"
    with pytest.raises(CommandError, match=expected):
        _rotate()
    assert dict(Machine.objects.values_list("name", "credential_ciphertext")) == before


def test_without_the_key_decryption_refuses_loudly(monkeypatch):
    monkeypatch.setenv("P2V_CREDENTIAL_KEY", "k1")
    token = encrypt_secret("secret")
    monkeypatch.setenv("P2V_CREDENTIAL_KEY", "k2")
    with pytest.raises(CredentialError, match="P2V_CREDENTIAL_OLD_KEYS"):
        decrypt_secret(token)
    monkeypatch.setenv("P2V_CREDENTIAL_OLD_KEYS", "k1")
    assert decrypt_secret(token) == "secret"
