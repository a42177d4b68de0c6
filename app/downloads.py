"""Streaming stored bytes to clients: Starlette's FileResponse (Range, If-Range, ETag), with its range errors
answered in Squeeze's error envelope instead of Starlette's plain text."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader
from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable

from app.errors import BadRequest, RangeNotSatisfiable


def file_download(request: Request, path: Path, *, sha256: str, filename: str, media_type: str) -> FileResponse:
    """A response for the blob at ``path``; a bad or unsatisfiable ``Range`` raises 400/416 with the envelope."""
    header = request.headers.get("range")
    if header is not None:
        size = path.stat().st_size
        try:
            FileResponse._parse_range_header(header, size)
        except MalformedRangeHeader as exc:
            raise BadRequest(f"invalid Range header: {exc.content}", code="invalid_range") from exc
        except StarletteRangeNotSatisfiable as exc:
            raise RangeNotSatisfiable(
                f"the range is outside the {size}-byte file", details={"size_bytes": size}
            ) from exc
    return FileResponse(path, media_type=media_type, filename=filename, headers={"ETag": f'"{sha256}"'})
