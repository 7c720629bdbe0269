"""Random secrets that are shown once and stored only as their SHA-256: API
tokens (core/tokens.py) and browser sessions' tickets and tokens
(core/sessions.py). A 256-bit random secret needs no slow hash (unlike a
password, core/users.py): the digest cannot be guessed back, and what a table
holds cannot be replayed."""

import hashlib
import secrets


def hash_secret(secret: str) -> str:
    """The SHA-256 of `secret`, as stored and looked up."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str = "") -> tuple[str, str]:
    """A new random secret (`prefix`, then 256 random bits as URL-safe text) and its hash."""
    secret = prefix + secrets.token_urlsafe(32)
    return secret, hash_secret(secret)
