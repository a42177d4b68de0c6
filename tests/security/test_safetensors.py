"""Hostile safetensors headers get a clean 4xx from the header alone, in bounded time; valid files are refused
as weights without a network (nothing to compress), never loaded."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
from safetensors.numpy import save


def _file(header: dict, data: bytes = b"", *, declared: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


VALID = save({"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float16)})
T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
HOSTILE = {
    "length past the end": _file({"w": T}, b"\0" * 16, declared=10**6),
    "huge header": _file({"w": T}, b"\0" * 16, declared=2**63),
    "overlapping": _file({"a": T, "b": {**T, "data_offsets": [8, 24]}}, b"\0" * 24),
    "short range": _file({"w": {**T, "data_offsets": [0, 8]}}, b"\0" * 8),
    "range past data": _file({"w": {**T, "data_offsets": [0, 16]}}, b"\0" * 4),
    "bad dtype": _file({"w": {**T, "dtype": "OBJ"}}, b"\0" * 16),
    "overflowing shape": _file({"w": {**T, "shape": [2**62, 2**62, 2**62], "data_offsets": [0, 16]}}, b"\0" * 16),
    "negative dim": _file({"w": {**T, "shape": [-2, -2]}}, b"\0" * 16),
    "gap": _file({"w": {**T, "data_offsets": [4, 20]}}, b"\0" * 20),
    "extra field": _file({"w": {**T, "code": "x"}}, b"\0" * 16),
    "not json": struct.pack("<Q", 6) + b'{"a":!' + b"\0" * 8,
    "metadata not strings": _file({"__metadata__": {"a": 1}, "w": T}, b"\0" * 16),
}


def test_a_valid_safetensors_file_is_recognised_and_refused_as_weights_only(client, alice) -> None:
    r = client.post("/v1/models", headers=alice, files={"file": ("model.safetensors", VALID)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "weights_without_architecture"
    assert "2 weight tensors" in r.json()["error"]["message"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_get_a_clean_422_quickly(client, alice, case: str) -> None:
    started = time.perf_counter()
    r = client.post("/v1/models", headers=alice, files={"file": ("m.safetensors", HOSTILE[case])})
    assert time.perf_counter() - started < 2.0
    assert r.status_code == 422, (case, r.text)
    assert r.json()["error"]["code"] == "invalid_safetensors", case


def _tar(entries: list[tuple[str, bytes]], links: dict[str, str] | None = None) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            link = tarfile.TarInfo(name)
            link.type = tarfile.SYMTYPE
            link.linkname = target
            tar.addfile(link)
    return buf.getvalue()


def test_hostile_tar_archives_are_refused_and_nothing_is_extracted(client, alice, data_dir) -> None:
    # Tars are read for one thing, a Hugging Face model folder, and only after every member passed the checks.
    entries = [("../escaped.onnx", b"onnx"), ("/tmp/absolute.onnx", b"onnx"), ("model.onnx", b"onnx")]
    r = client.post("/v1/models", headers=alice, files={"file": ("model.tar", _tar(entries, {"link": "/etc/passwd"}))})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsafe_archive"
    assert not (data_dir.parent / "escaped.onnx").exists() and not list(data_dir.rglob("escaped.onnx"))
    assert not list(data_dir.rglob("absolute.onnx"))


def test_a_tar_that_is_not_a_model_folder_is_refused(client, alice) -> None:
    r = client.post("/v1/models", headers=alice, files={"file": ("model.tar", _tar([("model.onnx", b"onnx")]))})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_format"
    assert "Hugging Face model folder" in r.json()["error"]["message"]
