"""Recognise pickles, and read one without running it.

Nothing here unpickles. ``pickletools.genops`` only decodes opcodes; :func:`pickle_imports` lists what a pickle
would import so that a ``torch.save`` blob that torch itself will load later (the sample inputs inside a ``.pt2``)
can be held to an allow-list of tensor-rebuilding globals first.
"""

from __future__ import annotations

import io
import pickletools
import zipfile

from app.errors import InvalidUpload

PICKLE_REFUSAL = (
    "Pickled checkpoints (torch.save, .pt/.pth/.pkl) are not accepted: loading a pickle can execute arbitrary "
    "code. Export the model with torch.export (torch.export.save(..., 'model.pt2')), to ONNX "
    "(torch.onnx.export) or to TorchScript (torch.jit.save(torch.jit.script(model), 'model.pt')) and upload that "
    "instead."
)

_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}

_STORAGES = {
    f"{kind}Storage"
    for kind in (
        "Float",
        "Double",
        "Half",
        "BFloat16",
        "Long",
        "Int",
        "Short",
        "Char",
        "Byte",
        "Bool",
        "ComplexFloat",
        "ComplexDouble",
    )
}
_DTYPES = {
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
}
# What torch.save writes for tensors, sizes, devices and plain containers: nothing that runs code of its own.
TENSOR_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("torch", "device"),
        ("collections", "OrderedDict"),
        # Protocol 2 (torch.save's) spells builtins the Python 2 way.
        *((module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "slice")),
        *(("torch", s) for s in _STORAGES),
        *(("torch", d) for d in _DTYPES),
    }
)


def looks_like_pickle(head: bytes) -> bool:
    """True for the header of a protocol 2-5 pickle (what torch.save and pickle.dump write by default)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def parses_as_pickle(data: bytes) -> bool:
    """True if ``data`` decodes, opcode by opcode, as one complete pickle (protocol 0 text pickles included)."""
    if not data or data[-1:] != b".":
        return False
    try:
        ops = list(pickletools.genops(io.BytesIO(data)))
    except Exception:
        return False
    return bool(ops) and ops[-1][0].name == "STOP" and ops[-1][2] + 1 == len(data)


def pickle_imports(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) the pickle would import, read statically.

    Raises ``InvalidUpload(pickle_not_accepted)`` when an import cannot be determined without running the pickle
    (a ``STACK_GLOBAL`` fed by anything but string constants, or the copyreg extension registry).
    """
    imports: list[tuple[str, str]] = []
    recent: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                imports.append((module, attr))
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or recent[-1] is None or recent[-2] is None:
                    raise _cannot_verify()
                imports.append((recent[-2], recent[-1]))
                recent.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise _cannot_verify()
            elif name in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
            elif name in _GET_OPS:
                recent.append(memo.get(int(arg)))
            elif name in _PUT_OPS:
                memo[int(arg)] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name not in ("PROTO", "FRAME"):
                recent.append(None)
    except InvalidUpload:
        raise
    except Exception as exc:
        raise InvalidUpload(
            "An embedded pickle is malformed.", code="pickle_not_accepted", details={"reason": "malformed"}
        ) from exc
    return imports


def _cannot_verify() -> InvalidUpload:
    return InvalidUpload(
        "An embedded pickle imports objects in a way that cannot be checked without running it.",
        code="pickle_not_accepted",
        details={"reason": "unverifiable_import"},
    )


def check_torch_tensor_pickle(blob: bytes, *, what: str, max_pickle_bytes: int = 16 * 1024**2) -> None:
    """Accept a ``torch.save`` ZIP only if its ``data.pkl`` imports nothing beyond tensor rebuilding.

    Torch loads such blobs with ``weights_only=True`` and, for some, falls back to a full unpickle; an allow-list
    of imports keeps both paths free of attacker-chosen code.
    """
    if not blob:
        return
    refusal = InvalidUpload(
        f"{what} is not a plain torch.save archive of tensors. {PICKLE_REFUSAL}",
        code="pickle_not_accepted",
        details={"member": what},
    )
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as inner:
            pkls = [i for i in inner.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pkls) != 1 or pkls[0].file_size > max_pickle_bytes:
                raise refusal
            with inner.open(pkls[0]) as fp:
                data = fp.read(max_pickle_bytes + 1)
    except InvalidUpload:
        raise
    except Exception as exc:
        raise refusal from exc
    if len(data) > max_pickle_bytes:
        raise refusal
    disallowed = sorted({f"{m}.{n}" for m, n in pickle_imports(data) if (m, n) not in TENSOR_PICKLE_GLOBALS})
    if disallowed:
        raise InvalidUpload(
            f"{what} imports {', '.join(disallowed[:5])}, which a tensor archive never needs. {PICKLE_REFUSAL}",
            code="pickle_not_accepted",
            details={"member": what, "imports": disallowed[:20]},
        )
