"""Encryption at rest for secrets we must use later in clear (tenants' provider API keys).

Fernet (AES-128-CBC + HMAC-SHA256) with a key derived from ALKEMY_ENCRYPTION_KEY, or from
SECRET_KEY when that is unset. Rotating the key makes stored secrets unreadable: they must be
entered again.
"""

from __future__ import annotations

import base64
import hashlib

from django.conf import settings


def _fernet():
    from cryptography.fernet import Fernet

    material = settings.ALKEMY_ENCRYPTION_KEY or settings.SECRET_KEY
    key = hashlib.sha256(b"alkemy-cast/secrets/v1:" + material.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    return _fernet().decrypt(token.encode()).decode()


def mask(secret: str) -> str:
    """What we show back: never the secret, only enough to recognise it."""
    return f"{secret[:4]}…{secret[-4:]}" if len(secret) > 12 else "…"
