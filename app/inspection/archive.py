"""ZIP and tar archives from uploads: every member checked before a byte is written, then extracted under one folder.

Used by the API (ONNX + external data, .pt2 and .npz are all ZIPs; a Hugging Face model folder may come as a ZIP or
a plain tar) and by the worker, which unpacks zipped ONNX models and model folders with :func:`safe_extract_zip` /
:func:`safe_extract_archive` before loading them. Both formats go through the same name rules
(:func:`normalize_member_name`), the same duplicate and nesting checks and the same extraction loop.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from app.errors import InvalidUpload

DEFAULT_MAX_MEMBERS = 1000
DEFAULT_MAX_TOTAL_BYTES = 8 * 1024**3
DEFAULT_MAX_RATIO = 200
# Below this size a high compression ratio cannot hurt (a 1 MiB file of zeros is not a bomb), and small JSON or
# all-zero tensors legitimately compress more than 200x.
RATIO_CHECK_MIN_BYTES = 1024**2

_MAX_NAME_LENGTH = 1024
_MAX_SEGMENT_LENGTH = 255
_CHUNK = 1024**2
_LOCAL_HEADER_MIN = 30
_SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# Errors zipfile and its decompressors raise on damaged or hostile input (bz2 raises OSError without an errno).
_ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    OSError,
)


@dataclass(frozen=True)
class ZipMember:
    """A member that passed the checks: its ``ZipInfo`` and its normalised, safe relative name."""

    info: zipfile.ZipInfo
    name: str
    is_dir: bool


def _shown(name: str) -> str:
    """A member name as it may appear in an error body: printable and bounded."""
    text = name.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:200] + "..."


def _unsafe(message: str, name: str | None = None, reason: str = "") -> InvalidUpload:
    details: dict[str, str] = {"reason": reason} if reason else {}
    if name is not None:
        details["member"] = _shown(name)
    return InvalidUpload(message, code="unsafe_archive", details=details)


def normalize_member_name(name: str) -> str:
    """The member name as a clean relative POSIX path, or ``unsafe_archive`` if it could escape a folder.

    Refused: empty names, NUL and control characters, backslashes, absolute paths, drive letters, ``..``
    segments, over-long names. ``.`` segments and doubled slashes are dropped; a trailing ``/`` (a directory) is
    kept out of the returned name.
    """
    if not name or name in {"/", "."}:
        raise _unsafe("An archive member has an empty name.", name, "empty_name")
    if len(name) > _MAX_NAME_LENGTH:
        raise _unsafe("An archive member name is too long.", name, "name_too_long")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise _unsafe("An archive member name contains NUL or control characters.", name, "control_character")
    if "\\" in name:
        raise _unsafe("An archive member name contains a backslash.", name, "backslash")
    if name.startswith("/"):
        raise _unsafe("An archive member has an absolute path.", name, "absolute_path")
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        raise _unsafe("An archive member name starts with a drive letter.", name, "drive_letter")
    segments = [s for s in name.split("/") if s not in ("", ".")]
    if not segments:
        raise _unsafe("An archive member has an empty name.", name, "empty_name")
    if any(s == ".." for s in segments):
        raise _unsafe("An archive member name contains a '..' segment.", name, "parent_segment")
    if any(len(s.encode("utf-8", "surrogatepass")) > _MAX_SEGMENT_LENGTH for s in segments):
        raise _unsafe("An archive member name has a path segment over 255 bytes.", name, "name_too_long")
    return "/".join(segments)


def single_root(names: list[str]) -> tuple[str, set[str]] | None:
    """(root folder, member names below it) when every normalised name lies in one root folder, else None.

    torch.export and torch.jit.save archives both keep everything under one folder named after the file.
    """
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1:
        return None
    root = next(iter(roots))
    return root, {n[len(root) + 1 :] for n in names if n.startswith(root + "/")}


def _declared_entry_count(path: Path) -> int | None:
    """Entries the end-of-central-directory record declares, read before zipfile parses the whole directory."""
    try:
        with path.open("rb") as fp:
            end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]  # stable since Python 2
    except (OSError, AttributeError, ValueError):
        return None
    if not end:
        return None
    return int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def open_zip(path: Path, *, max_members: int = DEFAULT_MAX_MEMBERS) -> zipfile.ZipFile:
    """Open ``path`` as a ZIP (``invalid_archive`` if it is not one; ``archive_too_large`` past ``max_members``)."""
    declared = _declared_entry_count(path)
    if declared is not None and declared > max_members:
        raise InvalidUpload(
            f"The archive has {declared} members; at most {max_members} are accepted.",
            code="archive_too_large",
            details={"members": declared, "max_members": max_members},
        )
    try:
        return zipfile.ZipFile(path)
    except _ZIP_READ_ERRORS as exc:
        raise InvalidUpload(
            f"The file is not a readable ZIP archive ({type(exc).__name__}).", code="invalid_archive"
        ) from exc


def check_zip_members(
    zf: zipfile.ZipFile,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> list[ZipMember]:
    """Every member of ``zf`` checked from the central directory alone; nothing is read or written.

    Refuses (``unsafe_archive``): unsafe names, symlinks and other non-regular entries, duplicates after
    normalisation (case-insensitively), a file that is also a directory, encrypted members, members whose data
    overlap (the overlapping-entry zip bomb), a compression ratio over ``max_ratio``. Refuses
    (``archive_too_large``) more than ``max_members`` members or over ``max_total_bytes`` uncompressed.
    """
    infos = zf.infolist()
    if len(infos) > max_members:
        raise InvalidUpload(
            f"The archive has {len(infos)} members; at most {max_members} are accepted.",
            code="archive_too_large",
            details={"members": len(infos), "max_members": max_members},
        )
    members: list[ZipMember] = []
    names = _MemberNames()
    total = 0
    for info in infos:
        raw = info.orig_filename
        name = normalize_member_name(raw)
        mode = info.external_attr >> 16
        if stat.S_IFMT(mode) == stat.S_IFLNK:
            raise _unsafe("The archive contains a symbolic link; only regular files are accepted.", raw, "symlink")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _unsafe("The archive contains a special file; only regular files are accepted.", raw, "special")
        if info.flag_bits & 0x1:
            raise _unsafe("The archive contains an encrypted member.", raw, "encrypted")
        if info.compress_type not in _SUPPORTED_COMPRESSION:
            raise InvalidUpload(
                f"Archive member uses an unsupported compression method ({info.compress_type}).",
                code="invalid_archive",
                details={"member": _shown(raw)},
            )
        is_dir = raw.endswith("/") or stat.S_IFMT(mode) == stat.S_IFDIR
        if is_dir and info.file_size:
            raise _unsafe("A directory entry in the archive carries data.", raw, "directory_with_data")
        names.add(name, raw, is_dir)
        total += info.file_size
        if total > max_total_bytes:
            raise _too_large(max_total_bytes)
        if info.file_size > RATIO_CHECK_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise _unsafe(
                f"An archive member is compressed more than {max_ratio:g}x (a zip bomb?).", raw, "compression_ratio"
            )
        members.append(ZipMember(info=info, name=name, is_dir=is_dir))

    names.check_nesting()
    _check_no_overlap(zf, infos)
    return members


def _too_large(max_total_bytes: int) -> InvalidUpload:
    return InvalidUpload(
        f"The archive expands to more than {max_total_bytes} bytes.",
        code="archive_too_large",
        details={"max_total_bytes": max_total_bytes},
    )


class _MemberNames:
    """Normalised member names seen so far: duplicates (case-insensitively) and files used as folders are refused."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}  # casefolded name -> "dir" | "file"
        self.names: list[str] = []

    def add(self, name: str, raw: str, is_dir: bool) -> None:
        key = name.casefold()
        if key in self.kinds:
            raise _unsafe(
                "The archive contains two members with the same name (after normalisation).", raw, "duplicate"
            )
        self.kinds[key] = "dir" if is_dir else "file"
        self.names.append(name)

    def check_nesting(self) -> None:
        # A name used both as a file and as a folder ("a" and "a/b") cannot be extracted faithfully.
        for name in self.names:
            parts = name.casefold().split("/")
            for i in range(1, len(parts)):
                if self.kinds.get("/".join(parts[:i])) == "file":
                    raise _unsafe("An archive member is nested under another member that is a file.", name, "conflict")


def _check_no_overlap(zf: zipfile.ZipFile, infos: Iterable[zipfile.ZipInfo]) -> None:
    ordered = sorted(infos, key=lambda i: i.header_offset)
    if not ordered:
        return
    limit = getattr(zf, "start_dir", None)
    for current, following in zip(ordered, [*ordered[1:], None], strict=True):
        end = current.header_offset + _LOCAL_HEADER_MIN + current.compress_size
        bound = following.header_offset if following is not None else limit
        if bound is not None and end > bound:
            raise _unsafe(
                "Archive members overlap each other (an overlapping-entry zip bomb?).",
                current.orig_filename,
                "overlap",
            )


def read_member(zf: zipfile.ZipFile, member: ZipMember, *, max_bytes: int, what: str) -> bytes:
    """The bytes of one member, refusing (``invalid_archive``/``unsafe_archive``) more than ``max_bytes``."""
    if member.info.file_size > max_bytes:
        raise InvalidUpload(
            f"{what} is {member.info.file_size} bytes; at most {max_bytes} are accepted.",
            code="archive_too_large",
            details={"member": _shown(member.name)},
        )
    return b"".join(_checked_chunks(zf, member))


def verify_zip_members(zf: zipfile.ZipFile, members: list[ZipMember]) -> None:
    """Stream every member's data once, without keeping it: sizes and CRCs confirmed (``invalid_archive``)."""
    for member in members:
        if not member.is_dir:
            for _ in _checked_chunks(zf, member):
                pass


def _checked_chunks(zf: zipfile.ZipFile, member: ZipMember) -> Iterator[bytes]:
    """A member's data in chunks; more or less data than it declares, or a bad CRC, is refused."""
    declared = member.info.file_size
    count = 0
    try:
        with zf.open(member.info) as src:
            while chunk := src.read(_CHUNK):
                count += len(chunk)
                if count > declared:
                    raise _unsafe("An archive member holds more data than it declares.", member.name, "size")
                yield chunk
    except _ZIP_READ_ERRORS as exc:
        raise InvalidUpload(
            f"Archive member could not be read ({type(exc).__name__}).",
            code="invalid_archive",
            details={"member": _shown(member.name)},
        ) from exc
    if count != declared:
        raise InvalidUpload(
            "An archive member holds less data than it declares.",
            code="invalid_archive",
            details={"member": _shown(member.name)},
        )


def _inside(root: str, candidate: str) -> bool:
    return os.path.commonpath([root, candidate]) == root


def safe_extract_zip(
    src: Path,
    dest: Path,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> list[Path]:
    """Extract the ZIP ``src`` into the empty folder ``dest`` and return the files written.

    All members are checked (:func:`check_zip_members`) before anything is written. While extracting, bytes are
    counted as they are read and a member that yields more than it declared is refused. Every path written is
    confirmed inside ``dest`` with ``os.path.commonpath`` on resolved paths, and files are created with
    ``O_EXCL | O_NOFOLLOW``. On any refusal, whatever was written under ``dest`` is removed.
    """
    _require_empty(dest)
    with open_zip(src, max_members=max_members) as zf:
        members = check_zip_members(zf, max_members=max_members, max_total_bytes=max_total_bytes, max_ratio=max_ratio)
        entries = [(m.name, m.is_dir, m.info.file_size, _zip_opener(zf, m.info)) for m in members]
        return _extract_entries(dest, entries)


def _zip_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    return lambda: zf.open(info)


def _require_empty(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"extraction folder {dest} is not empty")


# (normalised name, is a directory, declared size, opener of its data)
_Entry = tuple[str, bool, int, Callable[[], IO[bytes]]]


def _extract_entries(dest: Path, entries: list[_Entry]) -> list[Path]:
    """Write checked members under ``dest`` (see :func:`safe_extract_zip`); on any error ``dest`` is emptied."""
    root = os.path.realpath(dest)
    written: list[Path] = []
    try:
        for name, is_dir, declared, opener in entries:
            target = os.path.join(root, *name.split("/"))
            if not _inside(root, os.path.normpath(target)):
                raise _unsafe("An archive member would land outside the extraction folder.", name, "escape")
            if is_dir:
                os.makedirs(target, exist_ok=True)
                if not _inside(root, os.path.realpath(target)):
                    raise _unsafe("An archive folder resolves outside the extraction folder.", name, "escape")
                continue
            parent = os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            if not _inside(root, os.path.realpath(parent)) or os.path.realpath(parent) != os.path.normpath(parent):
                raise _unsafe("An archive member resolves outside the extraction folder.", name, "escape")
            _extract_member(name, declared, opener, target)
            written.append(Path(target))
    except BaseException:
        empty_folder(dest)
        raise
    return written


def _extract_member(name: str, declared: int, opener: Callable[[], IO[bytes]], target: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    count = 0
    fd = os.open(target, flags, 0o600)
    with os.fdopen(fd, "wb") as out:
        try:
            with opener() as src:
                while chunk := src.read(_CHUNK):
                    count += len(chunk)
                    if count > declared:
                        raise _unsafe("An archive member holds more data than it declares.", name, "size")
                    out.write(chunk)
        except (*_ZIP_READ_ERRORS, tarfile.TarError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a failure writing our own disk is ours, not the upload's
            raise InvalidUpload(
                f"Archive member could not be read ({type(exc).__name__}: {_shown(str(exc))}).",
                code="invalid_archive",
                details={"member": _shown(name)},
            ) from exc
    if count != declared:
        raise InvalidUpload(
            "An archive member holds less data than it declares.",
            code="invalid_archive",
            details={"member": _shown(name)},
        )


# ----------------------------------------------------------------------------------------------------------- tar
# Plain (uncompressed) POSIX/GNU tar only: the "ustar" magic at offset 257 identifies it. Compressed tars would need
# a ratio check on one stream for the whole archive; a ZIP does the same job with per-member checks.

TAR_MAGIC_OFFSET = 257
_TAR_HEADER = 512


def looks_like_tar(head: bytes) -> bool:
    """``head`` (at least the first 262 bytes of the file) starts a POSIX or GNU tar archive."""
    return head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] == b"ustar"


@dataclass(frozen=True)
class TarMember:
    """A tar member that passed the checks: its ``TarInfo`` and its normalised, safe relative name."""

    info: tarfile.TarInfo
    name: str
    is_dir: bool


def open_tar(path: Path) -> tarfile.TarFile:
    """Open ``path`` as a plain tar (``invalid_archive`` if it is not one, or is compressed)."""
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise InvalidUpload(
            f"The file is not a readable (uncompressed) tar archive ({type(exc).__name__}).", code="invalid_archive"
        ) from exc


def check_tar_members(
    tf: tarfile.TarFile,
    *,
    archive_size: int,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> list[TarMember]:
    """Every member of ``tf`` checked from its headers; no member data is read or written.

    Headers are read one at a time, so an archive with too many members is refused (``archive_too_large``) without
    listing all of them. Refused (``unsafe_archive``): the name rules of :func:`normalize_member_name`, symbolic and
    hard links, devices, FIFOs, sparse files and any other non-regular entry, duplicates after normalisation
    (case-insensitively), a file that is also a folder. A member whose data would run past the end of the file is
    ``invalid_archive``.
    """
    members: list[TarMember] = []
    names = _MemberNames()
    total = 0
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
            raise InvalidUpload(
                f"A tar header could not be read ({type(exc).__name__}).", code="invalid_archive"
            ) from exc
        if info is None:
            break
        if len(members) >= max_members:
            raise InvalidUpload(
                f"The archive has more than {max_members} members; at most {max_members} are accepted.",
                code="archive_too_large",
                details={"max_members": max_members},
            )
        raw = info.name
        name = normalize_member_name(raw)
        if info.issym() or info.islnk():
            raise _unsafe("The archive contains a link; only regular files and folders are accepted.", raw, "symlink")
        if info.issparse() or not (info.isreg() or info.isdir()):
            raise _unsafe("The archive contains a special file; only regular files are accepted.", raw, "special")
        if info.isdir() and info.size:
            raise _unsafe("A directory entry in the archive carries data.", raw, "directory_with_data")
        names.add(name, raw, info.isdir())
        total += info.size
        if total > max_total_bytes:
            raise _too_large(max_total_bytes)
        if info.isreg() and info.offset_data + info.size > archive_size:
            raise InvalidUpload(
                "A tar member runs past the end of the archive (truncated upload?).",
                code="invalid_archive",
                details={"member": _shown(raw)},
            )
        members.append(TarMember(info=info, name=name, is_dir=info.isdir()))
    names.check_nesting()
    return members


def safe_extract_tar(
    src: Path,
    dest: Path,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> list[Path]:
    """Extract the plain tar ``src`` into the empty folder ``dest`` as :func:`safe_extract_zip` does a ZIP.

    ``tarfile``'s own ``extractall`` is not used: every member is checked (:func:`check_tar_members`) before the
    first byte is written, and the writing is the same code, with the same checks, as for a ZIP.
    """
    _require_empty(dest)
    with open_tar(src) as tf:
        members = check_tar_members(
            tf, archive_size=src.stat().st_size, max_members=max_members, max_total_bytes=max_total_bytes
        )
        entries = [(m.name, m.is_dir, m.info.size, tar_opener(tf, m.info)) for m in members]
        return _extract_entries(dest, entries)


def tar_opener(tf: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    """A function opening the data of the regular member ``info`` (``tarfile.ExtractError`` if it has none)."""

    def opener() -> IO[bytes]:
        stream = tf.extractfile(info)
        if stream is None:
            raise tarfile.ExtractError(f"{info.name!r} has no data")
        return stream

    return opener


def safe_extract_archive(
    src: Path,
    dest: Path,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> list[Path]:
    """Extract a ZIP or plain tar (told apart by content) into the empty folder ``dest``; see the two above."""
    with src.open("rb") as fp:
        head = fp.read(_TAR_HEADER)
    if looks_like_tar(head):
        return safe_extract_tar(src, dest, max_members=max_members, max_total_bytes=max_total_bytes)
    return safe_extract_zip(src, dest, max_members=max_members, max_total_bytes=max_total_bytes, max_ratio=max_ratio)


def empty_folder(folder: Path) -> None:
    """Remove everything inside ``folder`` (an extraction folder), keeping the folder itself."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def find_onnx_in_dir(dest: Path) -> Path:
    """The one ``.onnx`` file under ``dest`` (an extracted upload); ``invalid_archive`` if there are none or several."""
    found = sorted(p for p in dest.rglob("*") if p.suffix.lower() == ".onnx" and p.is_file() and not p.is_symlink())
    if len(found) != 1:
        names = [p.relative_to(dest).as_posix() for p in found]
        raise InvalidUpload(
            f"The archive must contain exactly one .onnx file (found {len(found)}).",
            code="invalid_archive",
            details={"onnx_files": names[:20]},
        )
    return found[0]
