"""Content-addressed blob storage: every stored byte string lives under its sha256.

One interface (``ArtifactStore``) for the API and the workers. ``LocalArtifactStore`` keeps blobs on a local or
shared disk; ``S3ArtifactStore`` (``app.storage.s3``, chosen by ``SQUEEZE_STORAGE_BACKEND=s3``) keeps them in an
S3-compatible bucket, so that API and workers share no disk. boto3 is imported only when that backend is chosen.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple, Protocol

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1024 * 1024
PARALLEL_MIN = 64 * 1024  # a stream whose first chunk is smaller is hashed in place: a thread would cost more
IN_FLIGHT = 8 * 1024 * 1024
WRITEBACK_EVERY = 16 * 1024 * 1024


class BlobWriter(Protocol):
    """Receives a stream, hashes it as it goes, and commits it under its sha256 (or is aborted)."""

    temp_path: Path
    size: int

    def write(self, chunk: bytes) -> None: ...
    def flush(self) -> None: ...
    def sync(self) -> None: ...
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
    """Writes a stream to a temporary file in the store while hashing it, then renames it to its sha256.

    Two things keep a large upload from costing twice its receive time:
    - The hash runs on a thread of the writer's own, chunk after chunk in order, while the caller writes the
      chunk and goes on receiving (hashlib releases the GIL on large buffers). At most ``IN_FLIGHT`` bytes of
      chunks wait for it (references to the received chunks, never copies), so memory stays bounded when the
      hash is slower than the network. (Writing on a thread too was measured: more CPU, no faster.)
    - Every ``WRITEBACK_EVERY`` bytes the kernel is asked to start writing the file to disk (Linux
      ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, as PostgreSQL's ``*_flush_after`` and RocksDB's ``bytes_per_sync``
      do), so the disk works while the network delivers and the fsync at the end finds less left to write.
    Small streams (a first chunk under ``PARALLEL_MIN``) are hashed in place, without a thread.
    """

    writeback = True  # the S3 spool turns it off: its file is not where the blob lives

    def __init__(self, store: LocalArtifactStore) -> None:
        self._store = store
        self.temp_path = store.tmp_dir / f"upload-{uuid.uuid4().hex}"
        self._file: BinaryIO = open(self.temp_path, "xb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False
        self._synced = False
        self._hasher: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[None], int]] = deque()  # chunks on the hash thread, oldest first
        self._pending_bytes = 0
        self._written_back = 0  # bytes handed to the kernel's writeback so far

    def write(self, chunk: bytes) -> None:
        n = len(chunk)
        if self._hasher is None and n < PARALLEL_MIN:
            self._hash.update(chunk)
        else:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-hash")
            self._pending.append((self._hasher.submit(self._hash.update, chunk), n))
            self._pending_bytes += n
        self._file.write(chunk)
        self.size += n
        while self._pending_bytes > IN_FLIGHT:
            self._wait_oldest()
        if self.writeback and self.size - self._written_back >= WRITEBACK_EVERY:
            self._file.flush()
            _start_writeback(self._file.fileno(), self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def _wait_oldest(self) -> None:
        future, n = self._pending.popleft()
        self._pending_bytes -= n
        future.result()

    def _wait_all(self) -> None:
        while self._pending:
            self._wait_oldest()

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True, cancel_futures=True)
            self._hasher = None
        self._pending.clear()
        self._pending_bytes = 0

    def flush(self) -> None:
        """Everything written is hashed and in the file (not yet on disk: see :meth:`sync`)."""
        self._wait_all()
        self._file.flush()

    def sync(self) -> None:
        """Flush and fsync the temporary file; may run on a thread beside a reader of it (the inspection)."""
        self.flush()
        os.fsync(self._file.fileno())
        self._synced = True

    def commit(self) -> str:
        """fsync (unless :meth:`sync` did), then rename into place; the same bytes already stored are kept and the
        copy dropped."""
        if not self._synced:
            self.sync()
        self._stop_hasher()
        sha = self._hash.hexdigest()
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
            self._stop_hasher()
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


def _writeback_call() -> Callable[[int, int, int], object] | None:
    """libc's ``sync_file_range`` (Linux), which Python's ``os`` does not wrap; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _writeback_call()
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages in the range, do not wait for it


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` from ``offset`` to disk. Only a head start for the fsync that
    commits the blob: where the call is missing or fails, that fsync does all the work, as before."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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
