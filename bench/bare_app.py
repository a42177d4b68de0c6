"""The baseline of bench/status_throughput.py: a bare FastAPI app with one handler returning a constant JSON.

Served exactly as `squeeze serve` serves the real app: ``uvicorn.run(app, host=..., port=..., log_level="info")``
in one process (httptools and uvloop when installed, access log on).

    .venv/bin/python bench/bare_app.py PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI

app = FastAPI()
CONSTANT = {"status": "ok", "bare": True}


@app.get("/v1/jobs/{job_id}")
async def get_job(job_id: str) -> dict[str, object]:
    return CONSTANT


@app.get("/sync/v1/jobs/{job_id}")
def get_job_sync(job_id: str) -> dict[str, object]:
    """The same, as a plain ``def`` handler: run in the thread pool, as the real ``GET /v1/jobs/{id}`` is."""
    return CONSTANT


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
