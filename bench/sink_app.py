"""A reference point for bench/upload.py: the fastest any ASGI app served by uvicorn can take an upload here.

A bare ASGI app that reads the request body and throws it away (no hashing, no file, no framework), served as
`squeeze serve` serves the real app (``uvicorn.run(app, host, port)``: httptools and uvloop when installed). What
it cannot beat on a machine, the API cannot either.

    .venv/bin/python bench/sink_app.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    received, more = 0, True
    while more:
        message = await receive()
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(received).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
