"""Machine credentials encrypted at rest (Fernet: AES-128-CBC + HMAC-SHA256), with key rotation.

Keys (any strings: each is stretched with HKDF into a Fernet key):
  P2V_CREDENTIAL_KEY        the current key, used to encrypt; absent: derived from Django's SECRET_KEY
  P2V_CREDENTIAL_OLD_KEYS   comma-separated earlier keys, still accepted to decrypt

So a database dump alone never reveals a machine's private key, and a key can be replaced without
re-entering every credential: set the new key as P2V_CREDENTIAL_KEY, list the previous one (or
the old SECRET_KEY) in P2V_CREDENTIAL_OLD_KEYS, run `manage.py rotate_p2v_credentials` (which
re-encrypts every stored credential with the current key), then drop the old key. A credential
that no configured key can decrypt fails loudly, never silently.
"""

from __future__ import annotations

import base64
import os

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

HKDF_INFO = b"datacenter p2v machine credential v1"


class CredentialError(Exception):
    pass


def _fernet_for(secret: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(secret.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def configured_secrets() -> list[str]:
    """The key strings, current first (read per call, so a rotation needs no restart of tests)."""
    current = os.environ.get("P2V_CREDENTIAL_KEY") or settings.SECRET_KEY
    old = [item.strip() for item in os.environ.get("P2V_CREDENTIAL_OLD_KEYS", "").split(",") if item.strip()]
    return [current, *(secret for secret in old if secret != current)]


def _fernet() -> MultiFernet:
    return MultiFernet([_fernet_for(secret) for secret in configured_secrets()])


def encrypt_secret(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt_secret(token: str) -> str:
    if not token:
        raise CredentialError("no credential stored")
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise CredentialError(
            "the stored credential cannot be decrypted with the current key or any of "
            "P2V_CREDENTIAL_OLD_KEYS (P2V_CREDENTIAL_KEY or SECRET_KEY changed?): add the previous key to "
            "P2V_CREDENTIAL_OLD_KEYS, or enter the machine's private key again"
        ) from None


def reencrypt_secret(token: str) -> str:
    """The same plaintext encrypted with the current key (MultiFernet.rotate); CredentialError if
    no configured key opens it."""
    try:
        return _fernet().rotate(token.encode()).decode()
    except InvalidToken:
        raise CredentialError("no configured key decrypts this credential") from None


def is_current(token: str) -> bool:
    """Whether `token` is already encrypted with the current key."""
    try:
        _fernet_for(configured_secrets()[0]).decrypt(token.encode())
    except InvalidToken:
        return False
    return True
