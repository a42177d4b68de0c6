"""Receive an upload straight into the blob store: hashed while streaming, never held in memory or copied.

Starlette's ``request.form()`` spools each file to a temporary file first (a second copy, on a disk we do not
choose), so multipart bodies are parsed here with python-multipart's streaming parser instead, writing the
``file`` part's bytes directly into a ``BlobWriter``. A raw body (``Content-Type: application/octet-stream``) is
accepted too and is the fastest path for large files.
"""

from __future__ import annotations

import asyncio
import errno
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.errors import BadRequest, Forbidden, InsufficientStorage, InvalidUpload, PayloadTooLarge
from app.storage import ArtifactStore, BlobWriter

T = TypeVar("T")

MAX_FIELDS = 16
MAX_FIELD_BYTES = 4096
MAX_HEADER_BYTES = 16 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # room for boundaries and small fields beyond the file's own limit
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass
class ReceivedUpload:
    writer: BlobWriter
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)

    def display_name(self, default: str) -> str:
        """The client's name for the upload (field ``name``, else the file name), for display only, never a path.

        Control characters (NUL, CR, LF, ...) are dropped: PostgreSQL refuses NUL in text, and a name is shown in
        listings and logs. At most 256 characters.
        """
        for candidate in (self.fields.get("name"), self.filename):
            name = _CONTROL_CHARACTERS.sub("", candidate or "")[:256]
            if name:
                return name
        return default


class _MultipartSink:
    def __init__(self, writer: BlobWriter, max_bytes: int) -> None:
        self.writer = writer
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_seen = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._part_name: str | None = None
        self._part_is_file = False
        self._field_buf = bytearray()
        self._parts = 0
        self.complete = False

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_FIELDS + 1:
            raise BadRequest(f"too many form fields (at most {MAX_FIELDS})", code="too_many_fields")
        self._headers, self._header_bytes = {}, 0
        self._part_name, self._part_is_file = None, False
        self._field_buf = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise BadRequest("each multipart part needs Content-Disposition: form-data; name=...", code="bad_multipart")
        self._part_name = params[b"name"].decode("utf-8", "replace")
        if self._part_name == "file":
            if self.file_seen:
                raise BadRequest("send exactly one part named 'file'", code="bad_multipart")
            self.file_seen = True
            self._part_is_file = True
            raw = params.get(b"filename")
            # Kept only as a display name: it is never used as a path.
            self.filename = raw.decode("utf-8", "replace")[:256] if raw else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_is_file:
            if self.writer.size + (end - start) > self.max_bytes:
                raise PayloadTooLarge(
                    f"the file is larger than the limit of {self.max_bytes} bytes",
                    details={"limit_bytes": self.max_bytes},
                )
            self.writer.write(data[start:end])
        else:
            if len(self._field_buf) + (end - start) > MAX_FIELD_BYTES:
                raise BadRequest(f"form field {self._part_name!r} is too long", code="field_too_long")
            self._field_buf += data[start:end]

    def on_part_end(self) -> None:
        if not self._part_is_file and self._part_name is not None:
            self.fields[self._part_name] = self._field_buf.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.complete = True

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise BadRequest("multipart part headers are too large", code="bad_multipart")


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks. A client that goes away mid-upload is a refusal like any other, not a server error
    (unhandled, each one would log a traceback: a cheap way to flood the log)."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect as exc:
        raise BadRequest("the client disconnected before the upload was complete", code="client_disconnected") from exc


async def receive_upload(request: Request, writer: BlobWriter, max_bytes: int) -> ReceivedUpload:
    """Stream the request body into ``writer``; raise 413 from a streamed count, whatever the headers claim."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(
            f"the upload is larger than the limit of {max_bytes} bytes", details={"limit_bytes": max_bytes}
        )
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary or len(boundary) > 200:
            raise BadRequest("multipart body without a valid boundary", code="bad_multipart")
        sink = _MultipartSink(writer, max_bytes)
        parser = MultipartParser(
            boundary,
            callbacks={  # type: ignore[arg-type]
                "on_part_begin": sink.on_part_begin,
                "on_part_data": sink.on_part_data,
                "on_part_end": sink.on_part_end,
                "on_header_field": sink.on_header_field,
                "on_header_value": sink.on_header_value,
                "on_header_end": sink.on_header_end,
                "on_headers_finished": sink.on_headers_finished,
                "on_end": sink.on_end,
            },
        )
        total = 0
        async for chunk in _body(request):
            total += len(chunk)
            if total > max_bytes + MULTIPART_OVERHEAD:
                raise PayloadTooLarge(
                    f"the upload is larger than the limit of {max_bytes} bytes",
                    details={"limit_bytes": max_bytes},
                )
            try:
                parser.write(chunk)
            except (BadRequest, PayloadTooLarge, OSError):  # OSError: our own disk, not the client's body
                raise
            except Exception as exc:  # python-multipart raises its own errors on malformed bodies
                raise BadRequest(f"malformed multipart body: {exc}", code="bad_multipart") from exc
        parser.finalize()
        # python-multipart's finalize() does not check that the closing boundary arrived: a body cut short (or a
        # Content-Length smaller than what was sent) would otherwise be inspected and stored as if complete.
        if not sink.complete:
            raise BadRequest("the multipart body ends before its closing boundary", code="bad_multipart")
        if not sink.file_seen:
            raise BadRequest("the form has no part named 'file'", code="file_missing")
        return ReceivedUpload(writer, sink.filename, sink.fields)
    if content_type == b"application/octet-stream":
        async for chunk in _body(request):
            if writer.size + len(chunk) > max_bytes:
                raise PayloadTooLarge(
                    f"the upload is larger than the limit of {max_bytes} bytes",
                    details={"limit_bytes": max_bytes},
                )
            writer.write(chunk)
        fields = {"name": request.query_params["name"]} if "name" in request.query_params else {}
        return ReceivedUpload(writer, None, fields)
    raise BadRequest(
        "send the file as multipart/form-data (field 'file') or as an application/octet-stream body",
        code="unsupported_media_type",
    )


async def store_upload(
    request: Request,
    store: ArtifactStore,
    max_bytes: int,
    inspect: Callable[[Path], T],
    *,
    quota_bound: bool = False,
) -> tuple[ReceivedUpload, str, T]:
    """Receive, inspect and only then commit an upload. Anything refused leaves nothing behind.

    ``inspect`` runs in a worker thread on the received temporary file and raises ``InvalidUpload`` to refuse it.
    Returns the upload, its sha256 and what inspection found.
    """
    writer = store.writer()
    try:
        try:
            received = await receive_upload(request, writer, max_bytes)
        except PayloadTooLarge as exc:
            if quota_bound:  # the limit was what is left of the user's storage quota, not the size cap
                raise Forbidden(
                    "this upload does not fit in what is left of your storage quota",
                    code="storage_quota_exceeded",
                    details={"bytes_left": max_bytes},
                ) from exc
            raise
        writer.flush()
        if writer.size == 0:
            raise InvalidUpload("the uploaded file is empty", code="empty_file")
        # The inspection reads the file (CPU) while the fsync waits for the disk: side by side, not one after the
        # other. Both are awaited before anything is decided, so an abort never closes the file under either.
        inspected, synced = await asyncio.gather(
            run_in_threadpool(inspect, writer.temp_path), run_in_threadpool(writer.sync), return_exceptions=True
        )
        for outcome in (inspected, synced):
            if isinstance(outcome, BaseException):
                raise outcome
        found: T = inspected  # type: ignore[assignment]
        sha = await run_in_threadpool(writer.commit)
    except OSError as exc:
        writer.abort()
        if exc.errno == errno.ENOSPC:
            raise InsufficientStorage("the server's storage is full; nothing was kept") from exc
        raise
    except BaseException:
        writer.abort()
        raise
    return received, sha, found
