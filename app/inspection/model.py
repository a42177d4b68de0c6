"""Tell what an uploaded model file is from its bytes (never its name), and inspect it accordingly."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from app.errors import InvalidUpload
from app.inspection.archive import (
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_RATIO,
    DEFAULT_MAX_TOTAL_BYTES,
    check_tar_members,
    check_zip_members,
    empty_folder,
    find_onnx_in_dir,
    looks_like_tar,
    open_tar,
    open_zip,
    safe_extract_zip,
    tar_opener,
    verify_zip_members,
)
from app.inspection.hf import ArchiveFile, hf_root, inspect_hf
from app.inspection.onnx_model import inspect_onnx
from app.inspection.pickle_scan import PICKLE_REFUSAL, looks_like_pickle, parses_as_pickle
from app.inspection.pt2 import inspect_pt2, is_pt2_layout
from app.inspection.safetensors_header import looks_like_safetensors, read_safetensors_header
from app.inspection.schemas import ACCEPTED_MODELS, ModelInspection
from app.inspection.torchscript import inspect_torchscript, is_torchscript_layout

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_SQUEEZE_MAGIC = b"SQZ"  # squeeze.loader.MAGIC without its version digit (the API does not import the loader)
_PICKLE_SNIFF_BYTES = 1024**2
# Members by which torch.save archives and older pickled exports give themselves away.
_PICKLE_MEMBERS = ("data.pkl", "serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt")


def _pickle_refused() -> InvalidUpload:
    return InvalidUpload(PICKLE_REFUSAL, code="pickle_not_accepted", details={"accepted": ACCEPTED_MODELS})


def inspect_model(
    path: Path,
    workdir: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_ratio: float = DEFAULT_MAX_RATIO,
    max_pt2_members: int = 20_000,
) -> ModelInspection:
    """Inspect the uploaded model at ``path``; a zipped ONNX model is extracted into the empty folder ``workdir``.

    The format is read from the content. Raises ``InvalidUpload`` with a machine-readable ``code`` for anything
    that is not a well-formed, loadable-without-executing-code model of an accepted format.
    """
    size = path.stat().st_size
    if size == 0:
        raise InvalidUpload(f"The model file is empty. Accepted: {ACCEPTED_MODELS}.", code="invalid_model")
    with path.open("rb") as fp:
        head = fp.read(512)
    if looks_like_tar(head):
        return _inspect_tar(path, size=size, max_total_bytes=max_total_bytes, max_members=max_members)
    if head.startswith(_ZIP_MAGIC):
        return _inspect_zip(
            path,
            workdir,
            size=size,
            max_total_bytes=max_total_bytes,
            max_members=max_members,
            max_ratio=max_ratio,
            max_pt2_members=max_pt2_members,
        )
    if looks_like_pickle(head):
        raise _pickle_refused()
    if looks_like_safetensors(head, size):
        tensors = read_safetensors_header(path)  # refuses hostile headers with invalid_safetensors
        raise InvalidUpload(
            f"This safetensors file holds {len(tensors)} weight tensors but not the network that uses them. "
            f"Accepted: {ACCEPTED_MODELS}.",
            code="weights_without_architecture",
        )
    if head.startswith(_SQUEEZE_MAGIC):
        raise InvalidUpload(
            "This is a Squeeze storage file (.sqz), an output-only format. Decode it first "
            f"(`squeeze decode FILE -o model.onnx`) and upload the .onnx. Accepted: {ACCEPTED_MODELS}.",
            code="unsupported_format",
        )
    if head.startswith(b"\x93NUMPY"):
        raise InvalidUpload(
            f"This is a NumPy array, not a model. Accepted: {ACCEPTED_MODELS}.", code="unsupported_format"
        )
    try:
        return inspect_onnx(path, root=None, packaging="file")
    except InvalidUpload as exc:
        if exc.code == "invalid_model" and size <= _PICKLE_SNIFF_BYTES and parses_as_pickle(path.read_bytes()):
            raise _pickle_refused() from exc  # a protocol 0/1 (text) pickle
        raise


def _inspect_zip(
    path: Path,
    workdir: Path,
    *,
    size: int,
    max_total_bytes: int,
    max_members: int,
    max_ratio: float,
    max_pt2_members: int,
) -> ModelInspection:
    with open_zip(path, max_members=max(max_members, max_pt2_members)) as zf:
        names = [i.orig_filename for i in zf.infolist()]
        # The layout decides the member limit: a .pt2 and a TorchScript archive keep one file per weight tensor.
        looks_torch = any(n.endswith(("/archive_format", "/constants.pkl")) for n in names)
        members = check_zip_members(
            zf,
            max_members=max_pt2_members if looks_torch else max_members,
            max_total_bytes=max_total_bytes,
            max_ratio=max_ratio,
        )
        files = [m.name for m in members if not m.is_dir]
        if not files:
            raise InvalidUpload(f"The archive is empty. Accepted: {ACCEPTED_MODELS}.", code="invalid_archive")
        if is_pt2_layout(files):
            return inspect_pt2(zf, members, size_bytes=size)
        if is_torchscript_layout(files):  # told from a torch.save pickle ZIP by code/ and constants.pkl
            return inspect_torchscript(zf, members, size_bytes=size)
        if any(f.rsplit("/", 1)[-1] in _PICKLE_MEMBERS for f in files):
            raise _pickle_refused()
        prefix = hf_root(files)
        if prefix is not None:
            verify_zip_members(zf, members)  # sizes and CRCs, streamed: nothing is written
            entries = {
                m.name: ArchiveFile(m.name, m.info.file_size, _zip_opener(zf, m.info)) for m in members if not m.is_dir
            }
            return inspect_hf(entries, prefix, packaging="zip", size_bytes=size)
        onnx_files = [f for f in files if f.lower().endswith(".onnx")]
    if not onnx_files:
        raise InvalidUpload(
            f"The archive holds no model this service accepts. Accepted: {ACCEPTED_MODELS}.",
            code="unsupported_format",
            details={"members": files[:20]},
        )
    if len(onnx_files) > 1:
        raise InvalidUpload(
            f"The archive must contain exactly one .onnx file (found {len(onnx_files)}).",
            code="invalid_archive",
            details={"onnx_files": onnx_files[:20]},
        )
    safe_extract_zip(path, workdir, max_members=max_members, max_total_bytes=max_total_bytes, max_ratio=max_ratio)
    try:
        onnx_path = find_onnx_in_dir(workdir)
        return inspect_onnx(
            onnx_path,
            root=workdir,
            packaging="zip",
            extra_details={"onnx_path": onnx_path.relative_to(workdir).as_posix(), "archive_bytes": size},
        )
    except InvalidUpload:
        empty_folder(workdir)  # a refused upload leaves nothing behind
        raise


def _zip_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    return lambda: zf.open(info)


def _inspect_tar(path: Path, *, size: int, max_total_bytes: int, max_members: int) -> ModelInspection:
    """A plain tar is accepted for one thing: a Hugging Face model folder. Its members are checked first."""
    with open_tar(path) as tf:
        members = check_tar_members(tf, archive_size=size, max_members=max_members, max_total_bytes=max_total_bytes)
        entries = {m.name: ArchiveFile(m.name, m.info.size, tar_opener(tf, m.info)) for m in members if not m.is_dir}
        prefix = hf_root(list(entries))
        if prefix is None:
            raise InvalidUpload(
                "A tar archive is accepted only for a Hugging Face model folder (config.json with model.safetensors). "
                f"Accepted: {ACCEPTED_MODELS}.",
                code="unsupported_format",
                details={"members": sorted(entries)[:20]},
            )
        return inspect_hf(entries, prefix, packaging="tar", size_bytes=size)
