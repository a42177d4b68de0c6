"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph...), behind the same ``ArtifactStore`` interface.

Keys are ``<prefix>blobs/<first two hex digits>/<sha256>``. S3 shows an object under its key only once it is
complete (a PUT, or the completion of a multipart upload), so a half-written blob is never visible.

- Uploads to the API are spooled to a local file and hashed while they stream (the local store's writer: the API
  inspects that file before committing). Committing sends it in one PUT that carries its SHA-256, which the server
  checks against the bytes it received; from ``s3_multipart_threshold_bytes`` on, as a multipart upload (boto3's
  managed transfer: parts of ``s3_multipart_part_bytes`` in parallel, each with a checksum the server checks).
- Workers read blobs through ``local_path``: fetched into a local cache under the work dir (ranged GETs in
  parallel for large blobs), re-hashed, and renamed into place only if the sha256 matches. So API and workers
  share no disk. The cache keeps at most ``s3_cache_max_bytes``, dropping the least recently used blobs, but never
  one used within a job's time limit (a running job may still be about to open it).
- The API streams downloads from the bucket (a ``Range`` becomes a ranged GET), or answers with a presigned URL.
- Garbage collection (``iter_blobs``, ``delete_unused``) reads LastModified where the local store reads mtimes.

This module imports boto3: ``get_store`` imports it only when ``SQUEEZE_STORAGE_BACKEND=s3``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from app.storage import _SHA256, CHUNK, LocalArtifactStore, LocalBlobWriter, StoredBlob

if TYPE_CHECKING:
    from app.config import Settings

_MISSING = {"404", "NoSuchKey", "NotFound"}
TRANSFER_THREADS = 8


class BlobCorrupted(OSError):
    """The bytes fetched from the bucket do not hash to the blob's name."""


@dataclass
class BlobStream:
    """An open GET: the object's whole size, and its (possibly ranged) bytes. Iterate ``chunks`` or ``close``."""

    total_size: int
    chunks: Iterator[bytes]

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


class S3BlobWriter(LocalBlobWriter):
    """Spools and hashes exactly as the local writer does; ``commit`` uploads the spooled file and removes it."""

    writeback = False  # the spool is not where the blob lives: no early writeback, no fsync

    def __init__(self, store: S3ArtifactStore) -> None:
        super().__init__(store.spool)
        self._s3 = store

    def sync(self) -> None:
        self.flush()

    def commit(self) -> str:
        self.flush()
        self._stop_hasher()
        sha = self._hash.hexdigest()
        self._file.close()
        try:
            self._s3.upload(self.temp_path, sha, self.size)
        finally:
            self.temp_path.unlink(missing_ok=True)
        self._done = True
        return sha


class S3ArtifactStore:
    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.presigned_downloads = settings.s3_presigned_downloads
        self.presigned_expiry_s = settings.s3_presigned_expiry_s
        self.multipart_threshold = settings.s3_multipart_threshold_bytes
        self.cache_max_bytes = settings.s3_cache_max_bytes
        self.cache_grace_s = settings.job_time_limit_s
        work = settings.resolved_work_dir
        # Only the spool's tmp folder is used: uploads are written there, then sent to the bucket.
        self.spool = LocalArtifactStore(work / "uploads")
        self.cache_dir = work / "blob-cache"
        (self.cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self._transfer = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold_bytes,
            multipart_chunksize=settings.s3_multipart_part_bytes,
            max_concurrency=TRANSFER_THREADS,
        )
        self._endpoint = settings.s3_endpoint_url or None
        self._public_endpoint = settings.s3_public_endpoint_url or self._endpoint
        self._client_args: dict[str, Any] = {"region_name": settings.s3_region}
        if settings.s3_access_key_id.get_secret_value():
            self._client_args.update(
                aws_access_key_id=settings.s3_access_key_id.get_secret_value(),
                aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
            )
        self._clients: dict[tuple[str | None, bool], Any] = {}
        self._pid = os.getpid()

    # -- clients ---------------------------------------------------------------------------------------------

    def _client_for(self, endpoint: str | None, *, quick: bool = False) -> Any:
        """A client for ``endpoint``; ``quick``: one attempt with short timeouts (for /readyz, which must answer)."""
        # A client's connection pool must not cross a fork (Celery's prefork pool forks after start-up).
        if self._pid != os.getpid():
            self._clients, self._pid = {}, os.getpid()
        client = self._clients.get((endpoint, quick))
        if client is None:
            config = Config(
                signature_version="s3v4",
                # Path-style addressing for S3-compatible servers named by URL (MinIO, moto): no bucket DNS names.
                s3={"addressing_style": "path" if endpoint else "auto"},
                retries={"mode": "standard", "max_attempts": 1 if quick else 5},
                connect_timeout=2 if quick else 10,
                read_timeout=5 if quick else 120,
                max_pool_connections=TRANSFER_THREADS * 2,
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config, **self._client_args)
            self._clients[(endpoint, quick)] = client
        return client

    @property
    def client(self) -> Any:
        return self._client_for(self._endpoint)

    def key_for(self, sha256: str) -> str:
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return f"{self.prefix}blobs/{sha256[:2]}/{sha256}"

    # -- writing ---------------------------------------------------------------------------------------------

    def writer(self) -> S3BlobWriter:
        return S3BlobWriter(self)

    def upload(self, path: Path, sha256: str, size: int) -> None:
        """Send a local file already known to hash to ``sha256``.

        The same bytes already stored are kept, not sent again, but copied onto themselves inside the bucket: that
        refreshes their LastModified, so that ``delete_unused`` does not take them from the row about to refer
        to them (as the local writer refreshes an existing blob's mtime).
        """
        key = self.key_for(sha256)
        extra = {"Metadata": {"sha256": sha256}, "ContentType": "application/octet-stream"}
        if self.size(sha256) == size:
            try:
                self.client.copy(
                    {"Bucket": self.bucket, "Key": key},
                    self.bucket,
                    key,
                    ExtraArgs={**extra, "MetadataDirective": "REPLACE"},
                    Config=self._transfer,
                )
                return
            except ClientError as exc:
                if not _is_missing(exc):  # deleted meanwhile: store this copy
                    raise
        if size < self.multipart_threshold:
            with open(path, "rb") as f:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=f,
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
                    **extra,
                )
        else:
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=self._transfer)

    def put_file(self, path: Path) -> tuple[str, int]:
        """Store a worker's output file (hashed here, then uploaded; multipart when large)."""
        sha, size = _hash_file(path)
        self.upload(path, sha, size)
        return sha, size

    # -- reading ---------------------------------------------------------------------------------------------

    def _head(self, sha256: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self.key_for(sha256))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        return head

    def size(self, sha256: str) -> int | None:
        head = self._head(sha256)
        return None if head is None else int(head["ContentLength"])

    def exists(self, sha256: str) -> bool:
        return self.size(sha256) is not None

    def cached_path(self, sha256: str) -> Path:
        self.key_for(sha256)  # validates the name
        return self.cache_dir / sha256[:2] / sha256

    def local_path(self, sha256: str) -> Path:
        """The blob in the local cache, fetched first if needed and renamed in only once its sha256 matches."""
        path = self.cached_path(sha256)
        if path.is_file():
            os.utime(path)  # its last use, for the cache's eviction order
            return path
        tmp = self.cache_dir / "tmp" / f"fetch-{uuid.uuid4().hex}"
        try:
            try:
                self.client.download_file(self.bucket, self.key_for(sha256), str(tmp), Config=self._transfer)
            except ClientError as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(f"blob {sha256} is not in bucket {self.bucket}") from exc
                raise
            actual, _ = _hash_file(tmp)
            if actual != sha256:
                raise BlobCorrupted(f"blob {sha256} in bucket {self.bucket} holds other bytes (sha256 {actual})")
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=path)
        return path

    def open_blob(self, sha256: str, byte_range: tuple[int, int] | None = None) -> BlobStream | None:
        """Start a GET of the blob, or of ``[start, end)`` of it; None when the blob is missing."""
        extra = {"Range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"} if byte_range else {}
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key_for(sha256), **extra)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        body = resp["Body"]
        content_range = resp.get("ContentRange")
        total = int(content_range.rsplit("/", 1)[1]) if content_range else int(resp["ContentLength"])

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return BlobStream(total, chunks())

    def presigned_url(self, sha256: str, *, content_disposition: str, media_type: str) -> str:
        """A URL that lets its bearer GET the blob (Range included) for ``s3_presigned_expiry_s`` seconds."""
        url: str = self._client_for(self._public_endpoint).generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self.key_for(sha256),
                "ResponseContentDisposition": content_disposition,
                "ResponseContentType": media_type,
            },
            ExpiresIn=self.presigned_expiry_s,
        )
        return url

    def verify(self, sha256: str) -> bool:
        """Re-hash the stored object: True when its bytes still match its name."""
        blob = self.open_blob(sha256)
        if blob is None:
            raise FileNotFoundError(f"blob {sha256} is not in bucket {self.bucket}")
        h = hashlib.sha256()
        for chunk in blob.chunks:
            h.update(chunk)
        return h.hexdigest() == sha256

    # -- the rest --------------------------------------------------------------------------------------------

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key_for(sha256))
        self.cached_path(sha256).unlink(missing_ok=True)

    def iter_blobs(self) -> Iterator[StoredBlob]:
        """Every blob in the bucket under this store's prefix (multipart uploads in progress are not objects)."""
        base = f"{self.prefix}blobs/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                top, _, sha = obj["Key"].removeprefix(base).partition("/")
                if _SHA256.match(sha) and top == sha[:2]:
                    yield StoredBlob(sha, int(obj["Size"]), obj["LastModified"])

    def delete_unused(self, sha256: str, *, modified_before: datetime, unused: Callable[[], bool]) -> bool:
        """Delete a blob if it was last written before ``modified_before`` and ``unused()`` still says so.

        S3 cannot move an object aside atomically as the local store does. So LastModified is read again after
        ``unused()``, just before the DELETE: a writer storing the same bytes refreshes it (see ``upload``).
        What remains is a writer doing so within the one round trip between that read and the DELETE, for a
        blob that has had no row for the whole grace period.
        """

        def stale() -> bool:
            head = self._head(sha256)
            return head is not None and head["LastModified"] < modified_before

        if not stale() or not unused() or not stale():
            return False
        self.delete(sha256)
        return True

    def check(self) -> None:
        """Raise if the bucket cannot be reached with these credentials (used by /readyz)."""
        self._client_for(self._endpoint, quick=True).head_bucket(Bucket=self.bucket)

    def _evict(self, keep: Path) -> None:
        if not self.cache_max_bytes:
            return
        entries = []
        for p in self.cache_dir.glob("??/*"):
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        recent = time.time() - self.cache_grace_s
        for mtime, size, p in sorted(entries):
            if total <= self.cache_max_bytes:
                break
            if p != keep and mtime < recent:
                p.unlink(missing_ok=True)
                total -= size


def _is_missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
