"""Content-addressed blob storage: every stored byte string lives under its sha256.

One interface (``ArtifactStore``) for the API and the workers. ``LocalArtifactStore`` keeps blobs on a local or
shared disk; ``S3ArtifactStore`` (``app.storage.s3``, chosen by ``SQUEEZE_STORAGE_BACKEND=s3``) keeps them in an
S3-compatible bucket, so that API and workers share no disk. boto3 is imported only when that backend is chosen.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple, Protocol

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


class StoredBlob(NamedTuple):
    sha256: str
    size_bytes: int
    modified_at: datetime  # last written, or last found already stored by a writer (see ``delete_unused``)


class ArtifactStore(Protocol):
    def writer(self) -> BlobWriter: ...
    def put_file(self, path: Path) -> tuple[str, int]: ...
    def exists(self, sha256: str) -> bool: ...
    def size(self, sha256: str) -> int | None: ...
    def local_path(self, sha256: str) -> Path:
        """A local file with the blob's bytes (workers read it; S3 fetches it into a local cache first)."""
        ...

    def delete(self, sha256: str) -> None: ...
    def verify(self, sha256: str) -> bool: ...
    def check(self) -> None: ...
    def iter_blobs(self) -> Iterator[StoredBlob]: ...
    def delete_unused(self, sha256: str, *, modified_before: datetime, unused: Callable[[], bool]) -> bool: ...


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
        if _refresh(final, self.size):
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

    def size(self, sha256: str) -> int | None:
        """The stored blob's size in bytes; None when it is missing."""
        try:
            return self.path_for(sha256).stat().st_size
        except FileNotFoundError:
            return None

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

    def iter_blobs(self) -> Iterator[StoredBlob]:
        """Every committed blob (``ab/cd/<sha256>``); uploads in progress (in ``tmp``) are not blobs yet."""
        for top in _subdirs(self.root, 2):
            for mid in _subdirs(top, 2):
                for entry in os.scandir(mid):
                    if _SHA256.match(entry.name) and entry.name[:2] == top.name and entry.name[2:4] == mid.name:
                        st = entry.stat()
                        yield StoredBlob(entry.name, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def delete_unused(self, sha256: str, *, modified_before: datetime, unused: Callable[[], bool]) -> bool:
        """Delete a blob if it was last written before ``modified_before`` and ``unused()`` still says so.

        The blob is first moved aside, then checked: a writer committing the same bytes meanwhile either found it
        in place and refreshed its mtime (so it is put back) or found it gone and stored its own copy. ``unused``
        is asked after the move, so a row committed meanwhile keeps it too.
        """
        path = self.path_for(sha256)
        aside = self.tmp_dir / f"gc-{sha256}-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        fresh = datetime.fromtimestamp(aside.stat().st_mtime, UTC) >= modified_before
        if fresh or not unused():
            if path.exists():  # a writer stored the same bytes again meanwhile
                aside.unlink()
            else:
                os.replace(aside, path)
            return False
        aside.unlink()
        return True


def _refresh(path: Path, size: int) -> bool:
    """True if ``path`` holds a blob of ``size`` bytes, with its mtime set to now: a writer found these bytes
    already stored, and ``delete_unused`` must not take them away from the row about to refer to them."""
    try:
        if path.stat().st_size != size:
            return False
        os.utime(path)
    except FileNotFoundError:  # moved aside by delete_unused between the two calls: store our copy
        return False
    return True


def _subdirs(path: Path, name_length: int) -> Iterator[Path]:
    for entry in os.scandir(path):
        if len(entry.name) == name_length and entry.is_dir(follow_symlinks=False):
            yield Path(entry.path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache
def _store_at(root: Path) -> LocalArtifactStore:
    return LocalArtifactStore(root)


_s3_store: tuple[object, ArtifactStore] | None = None


def get_store() -> ArtifactStore:
    """The store the settings name (cached per settings, so tests that change settings get a fresh one)."""
    global _s3_store
    from app.config import get_settings

    settings = get_settings()
    if settings.storage_backend == "s3":
        if _s3_store is None or _s3_store[0] is not settings:
            from app.storage.s3 import S3ArtifactStore

            _s3_store = (settings, S3ArtifactStore(settings))
        return _s3_store[1]
    return _store_at(settings.resolved_storage_dir)
