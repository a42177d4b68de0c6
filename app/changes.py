"""What changed in the database, as PostgreSQL says it: the feed that keeps the API's in-process caches honest.

Triggers (migration 0008, PostgreSQL only) send ``pg_notify('squeeze_changes', '<kind>:<id>')`` when a row a cache
depends on is written, whoever writes it (this API process, another one, a worker on another machine, psql):
``job:<job id>`` for a job, its artifacts and its webhook deliveries; ``key:<prefix>`` for an API key; ``user:<id>``
for a user; ``all:<table>`` for a TRUNCATE. Each API process holds one connection that LISTENs and drops what the
notifications name.

Notifications reach a listener only while it is connected, so a cache may hold an entry only while the feed is
``live``: every cache is emptied when the feed connects (anything cached before may have missed a change) and when
it drops, and :meth:`ChangeFeed.fence` / :meth:`ChangeFeed.store_if_unchanged` keep a read that raced a change out
of a cache. The connection is checked every ``PING_S`` seconds, so a silently dead one is noticed; caches also
bound an entry's age (their ``max_age_s``) as a last line. SQLite has no notifications: there the feed is never
live and every read goes to the database.

Why not a library: cache invalidation from ``LISTEN`` is a few lines on psycopg's own ``notifies()``; the part that
matters (a read that raced a write must not be cached) is specific to how our caches fill.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy.engine import make_url

CHANNEL = "squeeze_changes"
APPLICATION_NAME = "squeeze-change-feed"  # how the listener shows in pg_stat_activity
PING_S = 5.0
RETRY_S = 1.0

log = logging.getLogger("squeeze.changes")


class ChangeFeed:
    """Subscribers by kind, and a counter of changes seen, for caches to tell a racing read from a fresh one.

    ``fence()`` before reading the database and ``store_if_unchanged(kind, id, fence, ...)`` after: the result is
    cached only if the feed stayed live and no change of ``kind:id`` arrived in between (a change committed before
    the read began, whose notification arrives after it, makes a fresh read look stale: it is just not cached, never
    the reverse).
    """

    def __init__(self, remembered: int = 100_000) -> None:
        self._lock = threading.RLock()
        self._subscribers: dict[str, list[Callable[[str], None]]] = {}
        self._resets: list[Callable[[], None]] = []
        self._seq = 0  # changes seen (and resets), in order
        self._changed_at: OrderedDict[str, int] = OrderedDict()  # "kind:id" -> seq of its last change
        self._floor = 0  # the newest seq forgotten from _changed_at (bounded): keys not in it changed at most then
        self._remembered = remembered
        self._listening = 0  # connections LISTENing now (one per app; tests may run several in one process)

    @property
    def live(self) -> bool:
        return self._listening > 0

    def subscribe(self, kind: str, on_change: Callable[[str], None], on_reset: Callable[[], None]) -> None:
        self._subscribers.setdefault(kind, []).append(on_change)
        self._resets.append(on_reset)

    def fence(self) -> int:
        return self._seq

    def store_if_unchanged(self, kind: str, ident: str, fence: int, store: Callable[[], None]) -> bool:
        """Run ``store`` (a cache's insert) if the feed is live and ``kind:ident`` has not changed since ``fence``;
        under the lock that :meth:`changed` holds while it drops entries, so the two cannot interleave."""
        with self._lock:
            if not self._listening or self._changed_at.get(f"{kind}:{ident}", self._floor) > fence:
                return False
            store()
            return True

    def changed(self, kind: str, ident: str) -> None:
        """``kind:ident`` changed: drop it from every cache (also called for this process's own commits)."""
        key = f"{kind}:{ident}"
        with self._lock:
            self._seq += 1
            self._changed_at[key] = self._seq
            self._changed_at.move_to_end(key)
            while len(self._changed_at) > self._remembered:
                _, seq = self._changed_at.popitem(last=False)
                self._floor = max(self._floor, seq)
            for on_change in self._subscribers.get(kind, ()):
                on_change(ident)

    def _reset(self, listening_change: int = 0) -> None:
        """Everything may have changed: every cache is emptied, and no read begun before may fill one."""
        with self._lock:
            self._seq += 1
            self._floor = self._seq
            self._changed_at.clear()
            self._listening += listening_change
            for on_reset in self._resets:
                on_reset()

    def dispatch(self, payload: str) -> None:
        kind, sep, ident = payload.partition(":")
        if kind == "all":  # a TRUNCATE: no row-by-row news
            self._reset()
        elif sep and ident:
            self.changed(kind, ident)

    async def listen_forever(self, database_url: str) -> None:
        """Hold a LISTEN connection for as long as the process runs; reconnect after a failure, never give up."""
        import psycopg

        url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            connected = False
            try:
                async with await psycopg.AsyncConnection.connect(
                    url, autocommit=True, application_name=APPLICATION_NAME
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._reset(+1)
                    connected = True
                    log.info("listening for database changes: job view and key caches on")
                    while True:
                        async for note in conn.notifies(timeout=PING_S):
                            self.dispatch(note.payload)
                        await conn.execute("SELECT 1")  # a dead connection raises here, at most PING_S late
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("database change feed down (%s: %s); caches off until it is back", type(e).__name__, e)
            finally:
                if connected:
                    self._reset(-1)
            await asyncio.sleep(RETRY_S)


FEED = ChangeFeed()


def feeds_changes(database_url: str) -> bool:
    """Whether this database sends change notifications (PostgreSQL) or caches stay off (SQLite)."""
    return make_url(database_url).get_backend_name() == "postgresql"


_ON_COMMIT_INSTALLED = False


def invalidate_on_commit() -> None:
    """Drop this process's own writes from its caches at commit, before the notification comes back: a client that
    cancels a job and reads it at once sees the cancel. (Core ``UPDATE`` statements are left to the notification.)"""
    global _ON_COMMIT_INSTALLED
    if _ON_COMMIT_INSTALLED:
        return
    _ON_COMMIT_INSTALLED = True
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from app.tables import ApiKey, Artifact, CompressionJob, User, WebhookDelivery

    names: dict[type, tuple[str, str]] = {
        CompressionJob: ("job", "id"),
        Artifact: ("job", "job_id"),
        WebhookDelivery: ("job", "job_id"),
        ApiKey: ("key", "prefix"),
        User: ("user", "id"),
    }

    @event.listens_for(Session, "after_flush")
    def _collect(session: Session, _context: object) -> None:
        for obj in (*session.new, *session.dirty, *session.deleted):
            if (name := names.get(type(obj))) is not None and (ident := getattr(obj, name[1], None)):
                session.info.setdefault("squeeze_changed", set()).add((name[0], str(ident)))

    @event.listens_for(Session, "after_commit")
    def _drop(session: Session) -> None:
        for kind, ident in session.info.pop("squeeze_changed", ()):
            FEED.changed(kind, ident)

    @event.listens_for(Session, "after_rollback")
    def _forget(session: Session) -> None:
        session.info.pop("squeeze_changed", None)
