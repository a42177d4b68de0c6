"""Inspect a TorchScript archive (``torch.jit.save``) without torch, without unpickling and without running its code.

A TorchScript archive is a ZIP with one root folder holding ``data.pkl`` (the module tree and its tensors),
``constants.pkl``, ``code/`` (the TorchScript source of every class), one file per tensor storage under ``data/``
and ``constants/``, and, for traced modules, ``traced_inputs.pkl``. A plain ``torch.save`` ZIP has ``data.pkl`` but
neither ``code/`` nor ``constants.pkl``; it stays refused as a pickle.

What torch does with an archive, and what is checked here first:

- Every pickle (``*.pkl``, ``*.debug_pkl``) is read by TorchScript's own C++ unpickler, which resolves a fixed set of
  globals and ``__torch__.*`` class names through the TorchScript type system (it does not import Python modules;
  a ``GLOBAL os system`` fails there with "Unknown type name"). Each pickle is still held, opcode by opcode and
  without being run, to the globals TorchScript archives contain; anything else is refused (``unsafe_model``).
- The ``code/`` files are TorchScript source. The API never runs them: it parses them with :mod:`ast` (parsing only)
  to read the forward signature and each class's parameter list, and refuses calls of operators that touch files
  (``from_file``) or live outside the standard namespaces. The worker compiles and runs them with the TorchScript
  interpreter, which can call registered operators but not Python, inside the sandboxed pipeline process.
- Shapes: TorchScript records none. A traced module carries its example inputs' metadata (``traced_inputs.pkl``);
  a scripted one does not, so its inputs are listed with ``shape`` and ``dtype`` null and jobs need a dataset.
"""

from __future__ import annotations

import ast
import io
import math
import pickletools
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from app.errors import InvalidUpload
from app.inspection.archive import ZipMember, read_member, single_root
from app.inspection.pickle_scan import TENSOR_PICKLE_GLOBALS, pickle_imports
from app.inspection.schemas import ModelInspection, TensorSpec

MAX_PICKLE_BYTES = 64 * 1024**2
MAX_CODE_FILE_BYTES = 16 * 1024**2
MAX_CODE_BYTES = 64 * 1024**2
_MAX_NODES = 5_000_000

# Storage class -> (numpy-style dtype, bytes per element).
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8),
    "ComplexDoubleStorage": ("complex128", 16),
    "QInt8Storage": ("qint8", 1),
    "QUInt8Storage": ("quint8", 1),
    "QInt32Storage": ("qint32", 4),
}
_WEIGHT_DTYPES = {"float32", "float64", "float16", "bfloat16", "qint8", "quint8", "qint32"}
_REBUILD_TENSOR = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_qtensor"}
# What TorchScript's pickler writes besides tensors: typed containers, quantization schemes, C++ classes.
TORCHSCRIPT_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *TENSOR_PICKLE_GLOBALS,
        *(("torch", s) for s in STORAGE_DTYPES),
        ("torch._utils", "_rebuild_qtensor"),
        *(
            ("torch.jit._pickle", name)
            for name in (
                "build_intlist",
                "build_tensorlist",
                "build_doublelist",
                "build_boollist",
                "build_tensor_from_id",
                "restore_type_tag",
            )
        ),
        *(
            ("torch", scheme)
            for scheme in (
                "per_tensor_affine",
                "per_channel_affine",
                "per_channel_affine_float_qparams",
                "per_tensor_symmetric",
                "per_channel_symmetric",
            )
        ),
        ("builtins", "complex"),
    }
)
# ``__torch__.<dotted identifiers>``: a class of the archive's own code/ or a registered C++ class (torch.classes).
_TORCH_CLASS_MODULE = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
OPERATOR_NAMESPACES = {"aten", "prim", "quantized", "_quantized", "quantized_decomposed", "prepacked"}
_FILE_OPERATORS = {"from_file"}  # reads a file named by the code
_CODE_PATH = re.compile(r"code/__torch__(/[A-Za-z0-9_]+)*\.py(\.debug_pkl)?")
_SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"


def _invalid(message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(f"Not a usable TorchScript archive: {message}", code="invalid_model", details=details)


def _unsafe(message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(
        f"The TorchScript archive contains {message}, which a plain torch.jit.save archive never holds.",
        code="unsafe_model",
        details=details,
    )


def is_torchscript_layout(names: list[str]) -> bool:
    """True for one root folder holding ``data.pkl``, ``constants.pkl`` and TorchScript source under ``code/``."""
    found = single_root(names)
    if found is None:
        return False
    rel = found[1]
    return {"data.pkl", "constants.pkl"} <= rel and any(r.startswith("code/") and r.endswith(".py") for r in rel)


# ----------------------------------------------------------------------------------------------------------------
# Reading a pickle's structure without running it.
#
# pickletools decodes opcodes; no library evaluates them without importing and calling what they name. This small
# stack machine does: GLOBAL becomes a name, REDUCE/NEWOBJ a record of (callable, arguments), BUILD attaches the
# state. Only plain data (numbers, strings, tuples, lists, dicts) is ever built, so shapes and storage keys can be
# read and nothing is imported or called.


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(eq=False)
class _Call:
    func: Any
    args: Any
    state: Any = None


@dataclass(eq=False)
class _PersistentId:
    pid: Any


@dataclass(frozen=True)
class _Tensor:
    dtype: str
    itemsize: int
    shape: tuple[int, ...]
    storage_key: str
    storage_numel: int
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_CONSTANT_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES",
    "BINBYTES8", "BYTEARRAY8",
}  # fmt: skip


def read_pickle(data: bytes, what: str) -> Any:
    """The object ``data`` describes, with globals, calls and persistent ids left as records (never resolved)."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if len(stack) != 1 or marks:
                    raise ValueError("unbalanced stack")
                return stack[0]
            if name in _CONSTANT_OPS:
                stack.append(arg)
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name in ("TUPLE", "LIST", "FROZENSET"):
                items = pop_mark()
                stack.append(tuple(items) if name == "TUPLE" else items)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = stack[-n:]
                del stack[-n:]
                if len(items) != n:
                    raise ValueError("stack underflow")
                stack.append(tuple(items))
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2], strict=True)))
            elif name == "APPEND":
                value = stack.pop()
                _as(stack[-1], list).append(value)
            elif name == "APPENDS":
                items = pop_mark()
                _as(stack[-1], list).extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                _as(stack[-1], dict)[key] = value
            elif name == "SETITEMS":
                items = pop_mark()
                _as(stack[-1], dict).update(zip(items[::2], items[1::2], strict=True))
            elif name == "EMPTY_SET":
                stack.append([])
            elif name == "ADDITEMS":
                items = pop_mark()
                _as(stack[-1], list).extend(items)
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append(_Global(module, attr))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                stack.append(_Global(_as(module, str), _as(attr, str)))
            elif name == "INST":
                module, _, attr = str(arg).partition(" ")
                stack.append(_Call(_Global(module, attr), tuple(pop_mark())))
            elif name == "OBJ":
                items = pop_mark()
                stack.append(_Call(items[0], tuple(items[1:])))
            elif name in ("REDUCE", "NEWOBJ"):
                args = stack.pop()
                stack.append(_Call(stack.pop(), args))
            elif name == "NEWOBJ_EX":
                kwargs, args = stack.pop(), stack.pop()
                stack.append(_Call(stack.pop(), (args, kwargs)))
            elif name == "BUILD":
                state = stack.pop()
                _as(stack[-1], _Call).state = state
            elif name == "PERSID":
                stack.append(_PersistentId(arg))
            elif name == "BINPERSID":
                stack.append(_PersistentId(stack.pop()))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[int(arg)])
            elif name == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            else:  # EXT1/2/4 (the copyreg registry), out-of-band buffers: never in a TorchScript archive
                raise _unsafe(f"a pickle opcode TorchScript never writes ({name})", member=what, opcode=name)
    except InvalidUpload:
        raise
    except Exception as exc:
        raise _invalid(f"{what} is not a well-formed pickle.", member=what) from exc
    raise _invalid(f"{what} ends before its STOP opcode.", member=what)


def _as(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _nodes(value: Any) -> Iterator[Any]:
    """Every value reachable from ``value``, each once, iteratively (no recursion limit), bounded in count."""
    stack, seen, count = [value], set(), 0
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        count += 1
        if count > _MAX_NODES:
            raise _invalid("a pickle is too large to inspect.")
        yield item
        if isinstance(item, dict):
            stack.extend([*item.keys(), *item.values()])
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, _Call):
            stack.extend([item.func, item.args, item.state])
        elif isinstance(item, _PersistentId):
            stack.append(item.pid)


def _tensor(value: Any) -> _Tensor | None:
    """The tensor a ``torch._utils._rebuild_*`` call would build, read from its arguments; None if not one."""
    if not (
        isinstance(value, _Call)
        and isinstance(value.func, _Global)
        and value.func.module == "torch._utils"
        and value.func.name in _REBUILD_TENSOR
    ):
        return None
    if not (isinstance(value.args, tuple) and len(value.args) >= 4 and isinstance(value.args[0], _PersistentId)):
        raise _invalid("a tensor is rebuilt from unexpected arguments.")
    pid = value.args[0].pid
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)):
        raise _invalid("a tensor refers to its storage in an unexpected way.")
    _, storage, key, _location, numel = pid
    offset, shape, stride = value.args[1], value.args[2], value.args[3]
    if storage.name not in STORAGE_DTYPES or not isinstance(key, str) or not re.fullmatch(r"[0-9]{1,9}", key):
        raise _invalid("a tensor has an unknown storage type or key.")
    ints = (shape, stride)
    if not all(isinstance(t, tuple) and all(type(d) is int and d >= 0 for d in t) for t in ints):
        raise _invalid("a tensor has a malformed shape or stride.")
    if len(shape) != len(stride) or type(numel) is not int or type(offset) is not int or min(numel, offset) < 0:
        raise _invalid("a tensor has a malformed size.")
    dtype, itemsize = STORAGE_DTYPES[storage.name]
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True)) if all(shape) else -1
    if last >= numel:
        raise _invalid("a tensor reaches past the end of its storage.")
    return _Tensor(dtype, itemsize, shape, key, numel, offset)


# ----------------------------------------------------------------------------------------------------------------
# The TorchScript source


@dataclass
class _ClassInfo:
    parameters: set[str] = field(default_factory=set)
    buffers: set[str] = field(default_factory=set)
    forward: ast.FunctionDef | None = None


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _check_operators(tree: ast.Module, what: str) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in _FILE_OPERATORS:
            raise _unsafe(f"a call of '{node.id}' (it reads files)", member=what)
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in _FILE_OPERATORS:
            raise _unsafe(f"a call of '{node.attr}' (it reads files)", member=what)
        parts = _dotted(node)
        if parts is None:
            continue
        if parts[:2] == ["torch", "ops"]:
            parts = parts[1:]
        if parts[0] == "ops" and len(parts) >= 2 and parts[1] not in OPERATOR_NAMESPACES:
            shown = ".".join(parts)[:200]
            raise InvalidUpload(
                f"The model calls the custom operator '{shown}'. Only the operator namespaces "
                f"{', '.join(sorted(OPERATOR_NAMESPACES))} are supported.",
                code="unsupported_operator_domain",
                details={"operators": [shown], "allowed_namespaces": sorted(OPERATOR_NAMESPACES), "member": what},
            )


def _string_list(value: ast.expr) -> set[str]:
    if isinstance(value, ast.List | ast.Tuple):
        return {e.value for e in value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def _read_code(zf: zipfile.ZipFile, rel: dict[str, ZipMember]) -> dict[str, _ClassInfo]:
    """Class name (``__torch__.a.b.C``) -> what its source declares; every file checked for operators."""
    classes: dict[str, _ClassInfo] = {}
    total = 0
    for name in sorted(r for r in rel if r.startswith("code/") and r.endswith(".py")):
        member = rel[name]
        total += member.info.file_size
        if total > MAX_CODE_BYTES:
            raise InvalidUpload(
                f"The TorchScript source is over {MAX_CODE_BYTES} bytes.", code="archive_too_large", details={}
            )
        text = read_member(zf, member, max_bytes=MAX_CODE_FILE_BYTES, what=name)
        try:
            tree = ast.parse(text.decode("utf-8"), filename=name)
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError) as exc:
            raise _invalid(f"{name} is not TorchScript source this service can read.", member=name) from exc
        _check_operators(tree, name)
        module = name[len("code/") : -len(".py")].replace("/", ".")
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            info = classes.setdefault(f"{module}.{node.name}", _ClassInfo())
            for item in node.body:
                if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name):
                    if item.targets[0].id == "__parameters__":
                        info.parameters = _string_list(item.value)
                    elif item.targets[0].id == "__buffers__":
                        info.buffers = _string_list(item.value)
                elif isinstance(item, ast.FunctionDef) and item.name == "forward":
                    info.forward = item
    return classes


# ----------------------------------------------------------------------------------------------------------------
# The archive


def _allowed_member(rel: str) -> bool:
    return bool(
        rel in {"data.pkl", "constants.pkl", "version", "byteorder", "traced_inputs.pkl"}
        or re.fullmatch(r"(data|constants|traced_inputs)/[0-9]{1,9}", rel)
        or re.fullmatch(rf"\.data/{_SAFE_NAME}", rel)
        or re.fullmatch(rf"extra/{_SAFE_NAME}", rel)
        or _CODE_PATH.fullmatch(rel)
    )


def _check_pickle_globals(data: bytes, what: str) -> None:
    disallowed = sorted(
        {
            f"{m}.{n}"
            for m, n in pickle_imports(data)
            if (m, n) not in TORCHSCRIPT_PICKLE_GLOBALS
            and not (_TORCH_CLASS_MODULE.fullmatch(m) and _IDENTIFIER.fullmatch(n))
        }
    )
    if disallowed:
        raise InvalidUpload(
            f"The TorchScript archive's {what} imports {', '.join(d[:100] for d in disallowed[:5])}, which a "
            "TorchScript archive never needs (it would run code when loaded). Only plain torch.jit.save output "
            "is accepted.",
            code="unsafe_model",
            details={"member": what, "imports": [d[:200] for d in disallowed[:20]]},
        )


def _read_checked_pickle(zf: zipfile.ZipFile, member: ZipMember, what: str) -> bytes:
    data = read_member(zf, member, max_bytes=MAX_PICKLE_BYTES, what=what)
    _check_pickle_globals(data, what)
    return data


@dataclass(frozen=True)
class _NamedTensor:
    path: str
    tensor: _Tensor
    counted: bool  # a parameter (or a weight inside a C++ class, such as packed quantized weights)


def _module_tensors(root: Any, classes: dict[str, _ClassInfo]) -> list[_NamedTensor]:
    """Every tensor in the module tree with its attribute path; parameters told from buffers by the class source."""
    found: list[_NamedTensor] = []
    stack: list[tuple[Any, str, _ClassInfo | None]] = [(root, "", None)]
    seen: set[int] = set()
    while stack:
        obj, path, owner = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if len(seen) > _MAX_NODES:
            raise _invalid("data.pkl is too large to inspect.")
        tensor = _tensor(obj)
        if tensor is not None:
            attr = path.rsplit(".", 1)[-1]
            # A TorchScript class lists its parameters; inside C++ classes (packed quantized weights) and plain
            # containers, weight dtypes decide.
            counted = attr in owner.parameters if owner is not None else tensor.dtype in _WEIGHT_DTYPES
            found.append(_NamedTensor(path, tensor, counted))
            continue
        prefix = f"{path}." if path else ""
        if isinstance(obj, _Call):
            cls = obj.func
            if isinstance(cls, _Global) and cls.module.startswith("__torch__"):
                info = classes.get(f"{cls.module}.{cls.name}")
                state = obj.state
                if isinstance(state, dict):
                    stack.extend((v, f"{prefix}{k}", info) for k, v in state.items() if isinstance(k, str))
                else:
                    stack.append((state, path, None))
            else:
                stack.append((obj.args, path, None))
        elif isinstance(obj, dict):
            stack.extend((v, f"{prefix}{k}", None) for k, v in obj.items())
        elif isinstance(obj, list | tuple):
            stack.extend((v, f"{prefix}{i}", None) for i, v in enumerate(obj))
    return found


def _check_storages(tensors: list[_Tensor], rel: dict[str, ZipMember], folder: str, what: str) -> None:
    for t in tensors:
        member = rel.get(f"{folder}/{t.storage_key}")
        if member is None:
            raise _invalid(f"{what} refers to the missing storage {folder}/{t.storage_key}.")
        if member.info.file_size < t.storage_numel * t.itemsize:
            raise _invalid(f"storage {folder}/{t.storage_key} holds fewer bytes than {what} declares.")


def _traced_inputs(data: bytes) -> list[_Tensor] | None:
    """The example inputs' metadata recorded for ``forward`` by ``torch.jit.trace``; None if not all tensors."""
    top = read_pickle(data, "traced_inputs.pkl")
    for node in _nodes(top):
        if isinstance(node, dict) and "forward" in node:
            value = node["forward"]
            while isinstance(value, _Call) and value.func == _Global("torch.jit._pickle", "restore_type_tag"):
                value = value.args[0] if isinstance(value.args, tuple) and value.args else None
            if not isinstance(value, list | tuple):
                return None
            tensors = [_tensor(v) for v in value]
            return None if any(t is None for t in tensors) else [t for t in tensors if t is not None]
    return None


def read_traced_inputs(zf: zipfile.ZipFile) -> list[tuple[tuple[int, ...], str]] | None:
    """(shape, dtype) of each example input a traced archive recorded, for the worker's random inputs."""
    names = [i.filename for i in zf.infolist() if i.filename.endswith("/traced_inputs.pkl")]
    if len(names) != 1:
        return None
    with zf.open(names[0]) as fp:
        data = fp.read(MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES:
        return None
    _check_pickle_globals(data, "traced_inputs.pkl")
    tensors = _traced_inputs(data)
    return None if tensors is None else [(t.shape, t.dtype) for t in tensors]


@dataclass(frozen=True)
class ForwardArgument:
    name: str
    annotation: str
    has_default: bool


def _forward_arguments(forward: ast.FunctionDef) -> tuple[list[ForwardArgument], str]:
    args = forward.args.args[1:]  # self
    first_default = len(args) - len(forward.args.defaults)
    arguments = [
        ForwardArgument(a.arg, ast.unparse(a.annotation) if a.annotation else "Tensor", i >= first_default)
        for i, a in enumerate(args)
    ]
    returns = ast.unparse(forward.returns) if forward.returns else "Tensor"
    return arguments, returns


def output_names(returns: str) -> list[str] | None:
    """Output names for a forward returning ``returns``: ``output``, or ``output_<i>`` for a tuple of tensors."""
    if returns == "Tensor":
        return ["output"]
    match = re.fullmatch(r"Tuple\[(Tensor(?:, Tensor)*)\]", returns)
    if match:
        return [f"output_{i}" for i in range(match.group(1).count("Tensor"))]
    return None


def inspect_torchscript(zf: zipfile.ZipFile, members: list[ZipMember], *, size_bytes: int) -> ModelInspection:
    """Inspect a checked TorchScript archive; nothing is extracted, unpickled or run."""
    files = [m for m in members if not m.is_dir]
    root = files[0].name.split("/", 1)[0]
    rel: dict[str, ZipMember] = {m.name[len(root) + 1 :]: m for m in files}
    for name in rel:
        if not _allowed_member(name):
            raise InvalidUpload(
                f"The TorchScript archive contains '{name[:100]}', which is not part of a plain torch.jit.save "
                "archive (mobile/lite-interpreter and packaged models are not accepted).",
                code="unsupported_format",
                details={"member": name[:100]},
            )
    for name, member in rel.items():
        if name.endswith(".debug_pkl"):
            _read_checked_pickle(zf, member, name)  # source ranges, read by torch when it reports errors

    classes = _read_code(zf, rel)
    module_tree = read_pickle(_read_checked_pickle(zf, rel["data.pkl"], "data.pkl"), "data.pkl")
    constants = read_pickle(_read_checked_pickle(zf, rel["constants.pkl"], "constants.pkl"), "constants.pkl")
    if not (isinstance(module_tree, _Call) and isinstance(module_tree.func, _Global)):
        raise _invalid("data.pkl does not hold a TorchScript module.")
    root_class = f"{module_tree.func.module}.{module_tree.func.name}"
    info = classes.get(root_class)
    if not _TORCH_CLASS_MODULE.fullmatch(module_tree.func.module) or info is None or info.forward is None:
        raise _invalid(f"the source of the top-level module {root_class[:200]!r} or of its forward is missing.")

    tensors = _module_tensors(module_tree, classes)
    _check_storages([t.tensor for t in tensors], rel, "data", "data.pkl")
    constant_tensors = [t for t in (_tensor(n) for n in _nodes(constants)) if t is not None]
    _check_storages(constant_tensors, rel, "constants", "constants.pkl")
    traced = None
    if "traced_inputs.pkl" in rel:
        traced = _traced_inputs(_read_checked_pickle(zf, rel["traced_inputs.pkl"], "traced_inputs.pkl"))

    arguments, returns = _forward_arguments(info.forward)
    required = [a for a in arguments if not a.has_default]
    not_tensors = [a for a in required if a.annotation != "Tensor"]
    if not_tensors:
        a = not_tensors[0]
        raise _invalid(
            f"forward takes '{a.name}: {a.annotation[:100]}'; only tensor inputs are supported.", argument=a.name
        )
    tensor_args = [a.name for a in required]
    if not tensor_args:
        raise _invalid("forward takes no tensor inputs.")
    shapes_known = traced is not None and len(traced) == len(tensor_args)
    inputs = [
        TensorSpec(
            name=name,
            shape=list(traced[i].shape) if shapes_known and traced else None,
            dtype=traced[i].dtype if shapes_known and traced else None,
        )
        for i, name in enumerate(tensor_args)
    ]
    outputs = [TensorSpec(name=n, shape=None, dtype=None) for n in output_names(returns) or []]

    counted: dict[tuple[str, int, tuple[int, ...]], int] = {}
    dtypes: dict[str, int] = {}
    for t in tensors:
        if t.counted:
            counted[(t.tensor.storage_key, t.tensor.offset, t.tensor.shape)] = t.tensor.numel
            dtypes[t.tensor.dtype] = dtypes.get(t.tensor.dtype, 0) + t.tensor.numel
    version = read_member(zf, rel["version"], max_bytes=16, what="version").strip() if "version" in rel else b""
    details: dict[str, Any] = {
        "archive_root": root,
        "module": root_class.removeprefix("__torch__."),
        "traced": "traced_inputs.pkl" in rel,
        "input_shapes": "from the traced example inputs" if shapes_known else "not recorded (scripted module)",
        "optional_arguments": [a.name for a in arguments if a.has_default],
        "returns": returns[:200],
        "parameter_tensors": len(counted),
        "parameter_dtypes": dtypes,
        "buffer_tensors": sum(1 for t in tensors if not t.counted),
        "constant_tensors": len(constant_tensors),
        "file_format_version": int(version) if version.isdigit() else None,
        "extra_files": sorted(n[len("extra/") :] for n in rel if n.startswith("extra/"))[:50],
        "size_bytes": size_bytes,
    }
    return ModelInspection(
        format="torchscript",
        packaging="file",
        inputs=inputs,
        outputs=outputs,
        parameters=sum(counted.values()),
        opset=None,
        details=details,
    )
