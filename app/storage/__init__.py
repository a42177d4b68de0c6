"""Content-addressed blob storage: every stored byte string lives under its sha256.

One interface (``ArtifactStore``) for the API and the workers. ``LocalArtifactStore`` keeps blobs on a local or
shared disk; an S3-compatible store implements the same interface for workers that share no disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1024 * 1024
PARALLEL_HASH_MIN = 64 * 1024
_HASHER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blob-hash")


class BlobWriter(Protocol):
    """Receives a stream, hashes it as it goes, and commits it under its sha256 (or is aborted)."""

    temp_path: Path
    size: int

    def write(self, chunk: bytes) -> None: ...
    def flush(self) -> None: ...
    def commit(self) -> str: ...
    def abort(self) -> None: ...


class ArtifactStore(Protocol):
    def writer(self) -> BlobWriter: ...
    def put_file(self, path: Path) -> tuple[str, int]: ...
    def exists(self, sha256: str) -> bool: ...
    def local_path(self, sha256: str) -> Path: ...
    def delete(self, sha256: str) -> None: ...
    def verify(self, sha256: str) -> bool: ...
    def check(self) -> None: ...


class LocalBlobWriter:
    def __init__(self, store: LocalArtifactStore) -> None:
        self._store = store
        self.temp_path = store.tmp_dir / f"upload-{uuid.uuid4().hex}"
        self._file: BinaryIO = open(self.temp_path, "xb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, chunk: bytes) -> None:
        if len(chunk) >= PARALLEL_HASH_MIN:
            # hashlib and file writes both release the GIL on large buffers: hash on another core while this
            # thread writes. Waiting for each chunk keeps the hash in order and bounds memory to one chunk.
            hashed = _HASHER.submit(self._hash.update, chunk)
            self._file.write(chunk)
            hashed.result()
        else:
            self._file.write(chunk)
            self._hash.update(chunk)
        self.size += len(chunk)

    def flush(self) -> None:
        self._file.flush()

    def commit(self) -> str:
        """fsync, then rename into place; the same bytes already stored are kept and the copy dropped."""
        sha = self._hash.hexdigest()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._store.path_for(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and final.stat().st_size == self.size:
            self.temp_path.unlink(missing_ok=True)
        else:
            os.replace(self.temp_path, final)
            _fsync_dir(final.parent)
        self._done = True
        return sha

    def abort(self) -> None:
        if not self._done:
            self._file.close()
            self.temp_path.unlink(missing_ok=True)
            self._done = True

    def __enter__(self) -> LocalBlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()


class LocalArtifactStore:
    """Blobs at ``root/ab/cd/<sha256>``; uploads land in ``root/tmp`` and are renamed in (same filesystem)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def writer(self) -> LocalBlobWriter:
        return LocalBlobWriter(self)

    def put_file(self, path: Path) -> tuple[str, int]:
        with self.writer() as w, open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                w.write(chunk)
            return w.commit(), w.size

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def local_path(self, sha256: str) -> Path:
        return self.path_for(sha256)

    def delete(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def verify(self, sha256: str) -> bool:
        """Re-hash a stored blob: True when its bytes still match its name."""
        h = hashlib.sha256()
        with open(self.path_for(sha256), "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest() == sha256

    def check(self) -> None:
        """Raise if the store cannot be written (used by /readyz)."""
        probe = self.tmp_dir / f"ready-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()

    def disk_free(self) -> int:
        return shutil.disk_usage(self.root).free


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache
def _store_at(root: Path) -> LocalArtifactStore:
    return LocalArtifactStore(root)


def get_store() -> LocalArtifactStore:
    """The store the settings name (cached per root, so tests that change settings get a fresh one)."""
    from app.config import get_settings

    return _store_at(get_settings().resolved_storage_dir)
