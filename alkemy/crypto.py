"""Encryption at rest for secrets we must use later in clear (tenants' provider API keys).

Fernet (AES-128-CBC + HMAC-SHA256). The keys are derived from the strings in
`settings.ALKEMY_ENCRYPTION_KEYS` (env `ALKEMY_ENCRYPTION_KEYS`, comma-separated, newest first), or
from SECRET_KEY when that list is empty. New secrets are encrypted with the newest key; every listed
key can decrypt (MultiFernet), so rotation is:

1. put the new key in front of the list (keep the old ones after it) and deploy;
2. `manage.py reencrypt_secrets` re-encrypts every stored secret with the newest key;
3. drop the old keys from the list.

A secret that no listed key can read (a key was dropped too early, or SECRET_KEY changed) raises
`SecretUnreadable`: callers show it as "unreadable, enter it again" instead of failing.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Literal

from django.conf import settings

from alkemy.errors import AlkemyError

SecretStatus = Literal["unset", "set", "unreadable"]


class SecretUnreadable(AlkemyError):
    """A stored secret that none of the configured encryption keys can decrypt."""

    status_code = 409
    code = "secret_unreadable"


def encryption_keys() -> list[str]:
    """The configured key strings, newest first; SECRET_KEY alone when none are configured."""
    return list(settings.ALKEMY_ENCRYPTION_KEYS) or [settings.SECRET_KEY]


def _fernet_key(material: str) -> bytes:
    # The derivation must stay exactly this: stored secrets were encrypted with it.
    return base64.urlsafe_b64encode(hashlib.sha256(b"alkemy-cast/secrets/v1:" + material.encode()).digest())


def _fernet():
    from cryptography.fernet import Fernet, MultiFernet

    return MultiFernet([Fernet(_fernet_key(material)) for material in encryption_keys()])


def encrypt(plaintext: str) -> str:
    """`plaintext` encrypted with the newest key, as a text token."""
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    """The plaintext of a token from `encrypt`, read with any configured key; SecretUnreadable otherwise."""
    from cryptography.fernet import InvalidToken

    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "The stored secret cannot be decrypted with the configured encryption keys; enter it again."
        ) from None


def reencrypt(token: str) -> str:
    """The same secret encrypted with the newest key (SecretUnreadable when no key can read it)."""
    from cryptography.fernet import InvalidToken

    try:
        return _fernet().rotate(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable("The stored secret cannot be decrypted with the configured encryption keys.") from None


def mask(secret: str) -> str:
    """What we show back: never the secret, only enough to recognise it."""
    return f"{secret[:4]}…{secret[-4:]}" if len(secret) > 12 else "…"


def secret_status(token: str) -> tuple[SecretStatus, str | None]:
    """How a stored secret shows to its owner: ("unset", None), ("set", masked) or ("unreadable", None)."""
    if not token:
        return "unset", None
    try:
        return "set", mask(decrypt(token))
    except SecretUnreadable:
        return "unreadable", None
