"""Users and bearer API keys. Keys are ``sqz_<prefix>_<secret>``; only the secret's sha256 is stored.

A key carries 192 random bits, so a plain sha256 (not a slow password hash) is the right digest: nothing to
brute-force, and lookups stay cheap on every request. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound, Unauthorized
from app.tables import ApiKey, User, utcnow

KEY_PREFIX = "sqz"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_user(session: Session, *, name: str, is_admin: bool = False) -> User:
    """Create a user; names are unique."""
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists", code="user_exists")
    user = User(name=name, is_admin=is_admin)
    session.add(user)
    session.flush()
    return user


def create_key(session: Session, *, user: User) -> str:
    """Issue a new key for ``user`` and return it in full (the only time it is ever visible)."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24)
    session.add(ApiKey(user_id=user.id, prefix=prefix, secret_sha256=_digest(secret)))
    session.flush()
    return f"{KEY_PREFIX}_{prefix}_{secret}"


def revoke_key(session: Session, *, key_or_prefix: str) -> ApiKey:
    """Revoke a key given in full or by its prefix (the part after ``sqz_``)."""
    parts = key_or_prefix.split("_")
    prefix = parts[1] if len(parts) >= 2 and parts[0] == KEY_PREFIX else key_or_prefix
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        raise NotFound("no such key", code="key_not_found")
    key.revoked_at = key.revoked_at or utcnow()
    return key


def find_user(session: Session, *, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}", code="user_not_found")
    return user


def authenticate(session: Session, token: str) -> User:
    """The user a bearer token belongs to; 401 for malformed, unknown or revoked keys alike."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2] or len(token) > 200:
        raise Unauthorized("malformed API key", code="invalid_api_key")
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    expected = key.secret_sha256 if key is not None else _digest("no-such-key")
    valid = hmac.compare_digest(expected, _digest(parts[2]))
    if key is None or not valid or key.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key", code="invalid_api_key")
    return key.user
