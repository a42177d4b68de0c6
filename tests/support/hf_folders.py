"""Hugging Face model folders as the tests upload them: a folder's files in a ZIP or a plain tar, and a tiny synthetic
folder (config, numpy-written safetensors, vocabulary) for inspection and submission tests, which read JSON and
safetensors headers only, so no trained model and no torch are needed.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np


def folder_files(folder: Path) -> dict[str, bytes]:
    """A folder's files by relative name."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zip_files(files: dict[str, bytes], root: str = "") -> bytes:
    """``files`` in a ZIP, at the top level or under the folder ``root``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{root}/{name}" if root else name, data)
    return buf.getvalue()


def tar_files(files: dict[str, bytes], root: str = "", extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """``files`` in a plain tar (as :func:`zip_files`); ``extra`` adds data-less members (links, devices...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{root}/{name}" if root else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()


def folder_zip_bytes(folder: Path, *, root: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    return zip_files({**folder_files(folder), **(extra or {})}, root)


def folder_tar_bytes(folder: Path, *, root: str = "") -> bytes:
    return tar_files(folder_files(folder), root)


# A synthetic folder for inspection and submission tests: inspection reads JSON and safetensors headers only, so
# numbers need not be a trained model's (and nothing here imports torch).
TINY_CONFIG = {
    "architectures": ["BertForSequenceClassification"],
    "model_type": "bert",
    "hidden_size": 8,
    "max_position_embeddings": 32,
    "type_vocab_size": 2,
    "id2label": {"0": "neg", "1": "pos"},
    "label2id": {"neg": 0, "pos": 1},
}
TINY_PARAMETERS = 10 * 8 + 2 * 8


def tiny_folder(changes: dict[str, bytes | dict | None] | None = None) -> dict[str, bytes]:
    """A model folder's files; ``changes`` replaces (dicts become JSON) or, with None, removes a file."""
    from safetensors.numpy import save

    weights = {
        "bert.embeddings.word_embeddings.weight": np.ones((10, 8), np.float32),
        "classifier.weight": np.ones((2, 8)),
    }
    files: dict[str, bytes] = {
        "config.json": json.dumps(TINY_CONFIG).encode(),
        "model.safetensors": save(weights),
        "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n",
        "tokenizer_config.json": json.dumps({"tokenizer_class": "BertTokenizer"}).encode(),
    }
    for name, value in (changes or {}).items():
        if value is None:
            files.pop(name, None)
        else:
            files[name] = json.dumps(value).encode() if isinstance(value, dict) else value
    return files
