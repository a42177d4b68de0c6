"""Webhooks: a job's final state POSTed to its ``notify_url``, signed, retried with backoff, recorded.

Only URLs under a prefix an admin allow-listed (``SQUEEZE_WEBHOOK_ALLOWED_URLS``) are accepted, compared by
parsed scheme, host, port and path segments (never by string prefix, which ``https://ok.example.com.evil.net``
would pass): a job spec cannot make the server call arbitrary addresses (SSRF). Signature: header
``X-Squeeze-Signature: sha256=<hex>`` = HMAC-SHA256(secret, ``<timestamp>.<body>``), timestamp in
``X-Squeeze-Timestamp``, as Stripe and GitHub do; receivers should reject old timestamps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import InvalidSpec
from app.tables import CompressionJob, WebhookDelivery, utcnow

log = logging.getLogger("squeeze.webhooks")
MAX_ATTEMPTS = 8
TIMEOUT_S = 5.0


def _parts(url: str) -> tuple[str, str, int, list[str]] | None:
    try:
        u = urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
        return None
    segments = [s for s in u.path.split("/") if s]
    if any(s in (".", "..") or "%2f" in s.lower() or "%2e" in s.lower() for s in segments):
        return None
    return u.scheme, u.hostname.lower(), port, segments


def check_notify_url(url: str, settings: Settings) -> None:
    """422 unless webhooks are configured and ``url`` lies under an allow-listed prefix."""
    if not settings.webhook_secret.get_secret_value():
        raise InvalidSpec("webhooks are not enabled on this deployment", code="webhooks_disabled")
    want = _parts(url)
    if want is not None:
        for allowed in settings.webhook_allowed_urls:
            base = _parts(allowed)
            if base is not None and want[:3] == base[:3] and want[3][: len(base[3])] == base[3]:
                return
    raise InvalidSpec(
        "notify_url is not under a URL an admin allowed for webhooks (SQUEEZE_WEBHOOK_ALLOWED_URLS)",
        code="notify_url_not_allowed",
    )


def queue_delivery(session: Session, job: CompressionJob) -> None:
    """Record the notification of ``job``'s final state, in the transaction that sets it."""
    url = (job.spec or {}).get("notify_url")
    if not url:
        return
    payload = {
        "event": f"job.{job.status}",
        "job": {
            "id": job.id,
            "status": job.status,
            "error": job.error,
            "cache_hit": job.cache_hit,
            "metrics": job.metrics,
            "url": f"/v1/jobs/{job.id}",
        },
    }
    session.add(WebhookDelivery(job_id=job.id, url=url, event=payload["event"], payload=payload))


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def deliver_due(settings: Settings, *, limit: int = 20) -> int:
    """Try every pending delivery that is due; returns how many were attempted."""
    from app.db import get_sessionmaker

    secret = settings.webhook_secret.get_secret_value()
    with get_sessionmaker()() as s:
        stmt = (
            select(WebhookDelivery)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
        if s.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)  # several API processes share the work
        due = list(s.scalars(stmt))
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as http:
            for d in due:
                _attempt(http, d, secret)
        s.commit()
    return len(due)


def _attempt(http: httpx.Client, d: WebhookDelivery, secret: str) -> None:
    body = json.dumps({**d.payload, "delivery_id": d.id}, separators=(",", ":"), default=str).encode()
    ts = str(int(time.time()))
    d.attempts += 1
    try:
        r = http.post(
            d.url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "squeeze-webhooks",
                "X-Squeeze-Event": d.event,
                "X-Squeeze-Delivery": d.id,
                "X-Squeeze-Timestamp": ts,
                "X-Squeeze-Signature": sign(secret, ts, body),
            },
        )
        ok, error = 200 <= r.status_code < 300, f"HTTP {r.status_code}"
    except httpx.HTTPError as exc:
        ok, error = False, f"{type(exc).__name__}: {exc}"[:500]
    if ok:
        d.status, d.delivered_at, d.last_error = "delivered", utcnow(), None
        return
    d.last_error = error
    if d.attempts >= MAX_ATTEMPTS:
        d.status = "failed"
        log.warning("webhook %s to %s failed for good: %s", d.id, d.url, error)
    else:
        d.next_attempt_at = utcnow() + timedelta(seconds=min(2 ** (d.attempts - 1), 300))


async def deliver_forever(settings: Settings, interval_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(deliver_due, settings)
        except Exception:
            log.exception("webhook delivery pass failed")


def delivery_view(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "event": d.event,
        "status": d.status,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "delivered_at": d.delivered_at,
    }
