"""Keep API keys out of the logs.

The access log writes each request's target, and a client may have put its key there (``?api_key=...``, or
pasted into a path). Keys in query strings are refused, but a refused key is still a live key if it was written
to a log that others read.
"""

from __future__ import annotations

import logging
import re

_KEY = re.compile(r"sqz_[0-9a-f]+_[A-Za-z0-9_-]+")  # the shape app.auth.service issues
_QUERY_VALUE = re.compile(r"=[^&]*")


def redact_target(target: str) -> str:
    """A request target fit for a log: every query value hidden (a key may sit under any name), keys removed."""
    path, sep, query = target.partition("?")
    return _KEY.sub("sqz_<redacted>", path + sep + _QUERY_VALUE.sub("=<redacted>", query))


class RedactRequestTargets(logging.Filter):
    """Rewrites the string arguments of uvicorn's access-log records (client, method, target, version)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_target(a) if isinstance(a, str) else a for a in record.args)
        return True


_FILTER = RedactRequestTargets()


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (idempotent; logger filters survive handler changes)."""
    logger = logging.getLogger("uvicorn.access")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
