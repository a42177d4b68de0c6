"""The blob writer that every upload and artifact goes through: bytes and sha256 exact whatever the chunking (the
hash runs on its own thread, in order), and an abort keeps nothing."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from app.storage import IN_FLIGHT, PARALLEL_MIN, LocalArtifactStore


def _chunks(data: bytes, seed: int) -> list[bytes]:
    """Irregular chunks: small ones first (hashed in place), then big and small mixed (through the hash thread)."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(data):
        n = rng.choice([1, 100, 4096, PARALLEL_MIN - 1]) if i < 200_000 else rng.choice([7, 65_536, 262_144, 3 << 20])
        out.append(data[i : i + n])
        i += n
    return out


def test_bytes_and_sha256_are_exact_whatever_the_chunking(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    data = os.urandom(40 * 1024 * 1024)  # beyond IN_FLIGHT and several writeback steps
    for seed in (1, 2):
        writer = store.writer()
        for chunk in _chunks(data, seed):
            writer.write(chunk)
            assert writer._pending_bytes <= IN_FLIGHT  # memory stays bounded
        sha = writer.commit()
        assert sha == hashlib.sha256(data).hexdigest()
        assert store.path_for(sha).read_bytes() == data
    assert not list(store.tmp_dir.iterdir())


def test_an_abort_mid_stream_keeps_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    writer = store.writer()
    for chunk in _chunks(os.urandom(12 * 1024 * 1024), 3):
        writer.write(chunk)
    writer.abort()
    assert not list(store.tmp_dir.iterdir())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
