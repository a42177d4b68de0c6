"""Users and bearer API keys. Keys are ``sqz_<prefix>_<secret>``; only the secret's sha256 is stored.

A key carries 192 random bits, so a plain sha256 (not a slow password hash) is the right digest: nothing to
brute-force, and lookups stay cheap on every request. Comparison is constant-time.

Every request is authenticated, but a key checked against the database in the last ``auth_cache_s`` seconds
(5 by default) is accepted from an in-process cache: the lookup was most of the cost of a status poll. So a key
revoked from another process (``squeeze keys revoke``, another API process) is refused at most that long later;
one revoked through this process is dropped from its cache at once. On PostgreSQL the database's change notifications
(app.changes) drop a key revoked or a user changed by any process within milliseconds; the TTL bounds the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached

from app.changes import FEED
from app.config import get_settings
from app.errors import Conflict, NotFound, Unauthorized
from app.tables import ApiKey, User, utcnow

KEY_PREFIX = "sqz"


@dataclass(frozen=True, slots=True)
class _CachedKey:
    prefix: str
    user: User  # detached, shared by the requests that present the key: read, never changed
    expires: float  # time.monotonic()


class KeyCache:
    """Keys that passed the database check recently: sha256 of the whole key -> its user, until a deadline.

    Only keys that were valid are cached (an unknown or revoked key is looked up every time), and an entry is
    found only by presenting the full key. Bounded: the oldest entry goes first once ``max_entries`` are held.
    Written by our own dict-plus-lock rather than a library because it needs a per-prefix drop on revocation.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[bytes, _CachedKey] = {}
        self._lock = threading.Lock()

    @staticmethod
    def digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, token: str) -> User | None:
        entry = self._entries.get(self.digest(token))
        if entry is None or entry.expires <= time.monotonic():
            return None
        return entry.user

    def put(self, token: str, prefix: str, user: User, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        copy = User(id=user.id, name=user.name, is_admin=user.is_admin, created_at=user.created_at)
        make_transient_to_detached(copy)  # like a row loaded by a session that has closed
        entry = _CachedKey(prefix, copy, time.monotonic() + ttl_s)
        with self._lock:
            self._entries.pop(self.digest(token), None)  # re-inserted at the end: the oldest are at the front
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[self.digest(token)] = entry

    def drop_prefix(self, prefix: str) -> None:
        with self._lock:
            for digest in [d for d, e in self._entries.items() if e.prefix == prefix]:
                del self._entries[digest]

    def drop_user(self, user_id: str) -> None:
        with self._lock:
            for digest in [d for d, e in self._entries.items() if e.user.id == user_id]:
                del self._entries[digest]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


KEY_CACHE = KeyCache()
FEED.subscribe("key", KEY_CACHE.drop_prefix, KEY_CACHE.clear)
FEED.subscribe("user", KEY_CACHE.drop_user, KEY_CACHE.clear)


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
    KEY_CACHE.drop_prefix(prefix)
    return key


def find_user(session: Session, *, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}", code="user_not_found")
    return user


def recently_authenticated(token: str) -> User | None:
    """The user of a key that passed :func:`authenticate` less than ``auth_cache_s`` ago; None otherwise."""
    return KEY_CACHE.get(token)


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
    KEY_CACHE.put(token, parts[1], key.user, get_settings().auth_cache_s)
    return key.user
