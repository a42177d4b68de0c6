"""Streaming stored bytes to clients, with ``ETag`` (the sha256), ``Range`` and ``If-Range``, and range errors
answered in Squeeze's error envelope instead of Starlette's plain text.

Local blobs go through Starlette's FileResponse (sendfile). Blobs in S3 are streamed from a GET (a ``Range`` becomes
a ranged GET), or, with ``SQUEEZE_S3_PRESIGNED_DOWNLOADS``, answered with a 307 to a presigned URL so that the
bytes do not pass through the API at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.responses import MalformedRangeHeader
from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable

from app.errors import BadRequest, RangeNotSatisfiable, ServiceUnavailable
from app.storage import ArtifactStore, LocalArtifactStore

if TYPE_CHECKING:
    from app.storage.s3 import S3ArtifactStore

# OpenAPI entries for the download routes beyond the error envelope.
REDIRECT_RESPONSE = {307: {"description": "Redirect to a presigned storage URL (S3 storage, presigned downloads on)"}}


def _ranges(header: str, size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges a Range header asks for (merged; empty: serve the whole file)."""
    try:
        return FileResponse._parse_range_header(header, size)
    except MalformedRangeHeader as exc:
        raise BadRequest(f"invalid Range header: {exc.content}", code="invalid_range") from exc
    except StarletteRangeNotSatisfiable as exc:
        raise RangeNotSatisfiable(f"the range is outside the {size}-byte file", details={"size_bytes": size}) from exc


def file_download(request: Request, path: Path, *, sha256: str, filename: str, media_type: str) -> FileResponse:
    """A response for the blob at ``path``; a bad or unsatisfiable ``Range`` raises 400/416 with the envelope."""
    header = request.headers.get("range")
    if header is not None:
        _ranges(header, path.stat().st_size)
    return FileResponse(path, media_type=media_type, filename=filename, headers={"ETag": f'"{sha256}"'})


def content_disposition(filename: str) -> str:
    """As Starlette's FileResponse writes it."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def blob_download(
    request: Request,
    store: ArtifactStore,
    *,
    sha256: str,
    size_bytes: int,
    filename: str,
    media_type: str,
    what: str,
) -> Response:
    """Download response for a stored blob of ``size_bytes``; 503 ``<what>_missing`` when storage lacks those bytes.

    Never serve bytes that are not the ones recorded (the ETag lets clients verify the full checksum).
    """
    missing = ServiceUnavailable(f"the {what}'s bytes are missing or damaged in storage", code=f"{what}_missing")
    if isinstance(store, LocalArtifactStore):
        if store.size(sha256) != size_bytes:
            raise missing
        return file_download(request, store.local_path(sha256), sha256=sha256, filename=filename, media_type=media_type)
    s3 = cast("S3ArtifactStore", store)
    disposition = content_disposition(filename)
    if s3.presigned_downloads:
        if s3.size(sha256) != size_bytes:
            raise missing
        url = s3.presigned_url(sha256, content_disposition=disposition, media_type=media_type)
        return RedirectResponse(url, status_code=307)

    etag = f'"{sha256}"'
    byte_range: tuple[int, int] | None = None
    header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if header is not None and (if_range is None or if_range == etag):
        ranges = _ranges(header, size_bytes)
        # Several ranges would need a multipart/byteranges body: served whole instead, as RFC 9110 allows.
        if len(ranges) == 1:
            byte_range = ranges[0]
    blob = s3.open_blob(sha256, byte_range)
    if blob is None or blob.total_size != size_bytes:
        if blob is not None:
            blob.close()
        raise missing
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Disposition": disposition}
    if byte_range is None:
        headers["Content-Length"] = str(size_bytes)
        return StreamingResponse(blob.chunks, media_type=media_type, headers=headers)
    start, end = byte_range
    headers["Content-Length"] = str(end - start)
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size_bytes}"
    return StreamingResponse(blob.chunks, status_code=206, media_type=media_type, headers=headers)
