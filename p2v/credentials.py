"""Machine credentials encrypted at rest (Fernet: AES-128-CBC + HMAC-SHA256).

The key comes from P2V_CREDENTIAL_KEY when set (any string: it is stretched with HKDF), else it is
derived from Django's SECRET_KEY, so a database dump alone never reveals a machine's private key.
Rotating the key means re-entering credentials: decryption fails loudly, never silently.
"""

from __future__ import annotations

import base64
import os

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

HKDF_INFO = b"datacenter p2v machine credential v1"


class CredentialError(Exception):
    pass


def _fernet() -> Fernet:
    secret = os.environ.get("P2V_CREDENTIAL_KEY") or settings.SECRET_KEY
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(secret.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt_secret(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt_secret(token: str) -> str:
    if not token:
        raise CredentialError("no credential stored")
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise CredentialError(
            "the stored credential cannot be decrypted with the current key "
            "(P2V_CREDENTIAL_KEY or SECRET_KEY changed?): enter the machine's private key again"
        ) from None
