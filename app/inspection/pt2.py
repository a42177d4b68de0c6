"""Inspect a torch.export archive (``.pt2``) from its JSON alone, without torch and without extracting it.

``torch.export.load`` trusts its input: it unpickles some members (legacy weights, tensor subclasses, custom
objects, and sample inputs when ``weights_only`` loading fails), evaluates every symbolic-shape string with
``sympy.sympify`` (which runs ``eval``), resolves operator names with ``getattr`` on ``torch``, imports modules
named in tree specs, and compiles ``guards_code`` into Python. An upload therefore passes only if every one of
those inputs is of the plain kind ``torch.export.save`` writes for an ordinary model; anything else is refused here,
before the worker ever loads it.
"""

from __future__ import annotations

import json
import keyword
import math
import re
import zipfile
from typing import Any

from app.errors import InvalidUpload
from app.inspection.archive import ZipMember, read_member, single_root
from app.inspection.pickle_scan import PICKLE_REFUSAL, check_torch_tensor_pickle
from app.inspection.pt2_strings import check_guard_code, check_sym_expr
from app.inspection.schemas import ModelInspection, TensorSpec

MAX_MODEL_JSON_BYTES = 64 * 1024**2
MAX_CONFIG_JSON_BYTES = 16 * 1024**2
MAX_SAMPLE_INPUTS_BYTES = 64 * 1024**2
_MAX_JSON_NODES = 5_000_000

# torch._export.serde.schema.ScalarType -> (numpy-style name, bytes per element)
SCALAR_TYPES: dict[int, tuple[str, int]] = {
    1: ("uint8", 1),
    2: ("int8", 1),
    3: ("int16", 2),
    4: ("int32", 4),
    5: ("int64", 8),
    6: ("float16", 2),
    7: ("float32", 4),
    8: ("float64", 8),
    9: ("complex32", 4),
    10: ("complex64", 8),
    11: ("complex128", 16),
    12: ("bool", 1),
    13: ("bfloat16", 2),
    28: ("uint16", 2),
    29: ("float8_e4m3fn", 1),
    30: ("float8_e5m2", 1),
    31: ("float8_e4m3fnuz", 1),
    32: ("float8_e5m2fnuz", 1),
    33: ("float8_e8m0fnu", 1),
    34: ("uint32", 4),
    35: ("uint64", 8),
}

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
_SYMBOL_DIM = re.compile(r"Symbol\('([a-z]{1,4}[0-9]{1,9})'(?:, [a-z]+=(?:True|False))*\)")
_INTEGER = re.compile(r"Integer\((-?[0-9]+)\)")
_OPERATOR_NAMESPACES = {"aten", "prims", "quantized_decomposed", "torchao", "higher_order", "quantized"}
_DENIED_ATEN = {"from_file"}  # reads a file named by the graph
_ATEN_DUNDER = re.compile(r"__i?(and|or|xor|lshift|rshift)__")
_PY_OPERATORS = {
    "getitem",
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "neg",
    "pos",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and_",
    "or_",
    "xor",
    "not_",
    "abs",
    "invert",
    "lshift",
    "rshift",
}
_TORCH_SYM_FUNCTIONS = {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "_sym_sqrt"}
_MATH_FUNCTIONS = {"ceil", "floor", "trunc", "sqrt"}
_TREESPEC_TYPES = {
    None,
    "builtins.tuple",
    "builtins.list",
    "builtins.dict",
    "collections.OrderedDict",
    "collections.namedtuple",
    "torch.fx.immutable_collections.immutable_list",
    "torch.fx.immutable_collections.immutable_dict",
}


def _invalid(message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(f"Not a usable torch.export (.pt2) archive: {message}", code="invalid_model", details=details)


def _unsafe(message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(
        f"The .pt2 archive contains {message}, which torch would execute or import when loading it. Only plain "
        "torch.export.save output of standard ATen operators is accepted.",
        code="unsafe_model",
        details=details,
    )


def is_pt2_layout(names: list[str]) -> bool:
    """True if the normalised member names look like a torch.export archive (whatever else they contain)."""
    found = single_root(names)
    if found is None:
        return False
    rel = found[1]
    return "archive_format" in rel and any(re.fullmatch(r"models/[^/]+\.json", r) for r in rel)


def _allowed_member(rel: str, model: str) -> str | None:
    """'ok', 'pickle' or None (not something this service knows how to load safely)."""
    weights, constants = "data/weights/", "data/constants/"
    if rel in {"archive_format", "archive_version", "byteorder", "version"}:
        return "ok"
    if re.fullmatch(rf"\.data/{_NAME}", rel):
        return "ok"
    if rel in {
        f"models/{model}.json",
        f"{weights}{model}_weights_config.json",
        f"{constants}{model}_constants_config.json",
        f"data/sample_inputs/{model}.pt",
    }:
        return "ok"
    if re.fullmatch(rf"{weights}weight_[0-9]+", rel) or re.fullmatch(rf"{constants}tensor_[0-9]+", rel):
        return "ok"
    if rel.endswith((".pt", ".pth", ".pkl", ".pickle", ".bin")) or re.search(r"(custom|opaque)_obj_", rel):
        return "pickle"
    if re.fullmatch(rf"extra/{_NAME}", rel):
        return "ok"
    return None


def _walk(value: Any) -> Any:
    """Every dict and list inside ``value``, iteratively (no recursion limit), bounded in count."""
    stack = [value]
    seen = 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > _MAX_JSON_NODES:
            raise _invalid("model.json is too large to inspect.")
        if isinstance(item, dict):
            yield item
            stack.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            yield item
            stack.extend(v for v in item if isinstance(v, dict | list))


def check_operator_target(target: str) -> None:
    """Refuse a node target that is not a standard operator (``unsafe_model``/``unsupported_operator_domain``)."""
    shown = target[:200]
    parts = target.split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise _unsafe(f"the operator '{shown}'", target=shown)
    # Dunder names would let getattr walk to Python internals; ATen's bitwise operators are the only exception.
    if any(p.startswith("__") and not (i == 3 and _ATEN_DUNDER.fullmatch(p)) for i, p in enumerate(parts)):
        raise _unsafe(f"the operator '{shown}'", target=shown)
    if parts[:2] == ["torch", "ops"] and len(parts) in (4, 5):
        namespace = parts[2]
        if namespace not in _OPERATOR_NAMESPACES:
            raise InvalidUpload(
                f"The model calls the custom operator '{shown}'. Only ATen, prims, quantization and higher-order "
                f"operators ({', '.join(sorted(_OPERATOR_NAMESPACES))}) are supported.",
                code="unsupported_operator_domain",
                details={"operators": [shown], "allowed_namespaces": sorted(_OPERATOR_NAMESPACES)},
            )
        if namespace == "aten" and parts[3] in _DENIED_ATEN:
            raise _unsafe(f"the operator '{shown}' (it reads files)", target=shown)
        return
    if len(parts) == 2 and (
        (parts[0] == "_operator" and parts[1] in _PY_OPERATORS)
        or (parts[0] == "torch" and parts[1] in _TORCH_SYM_FUNCTIONS)
        or (parts[0] == "math" and parts[1] in _MATH_FUNCTIONS)
    ):
        return
    raise _unsafe(f"the call target '{shown}'", target=shown)


def _check_treespec(spec: str) -> None:
    if "__enum__" in spec or "default_factory" in spec:
        raise _unsafe("a tree spec that imports a module", spec=spec[:200])
    try:
        decoded = json.loads(spec)
    except (ValueError, RecursionError) as exc:
        raise _invalid("a tree spec is not valid JSON.") from exc
    for item in _walk(decoded):
        if isinstance(item, dict) and "type" in item and item["type"] not in _TREESPEC_TYPES:
            raise _unsafe(f"a tree spec of type '{str(item['type'])[:100]}'", spec=spec[:200])


def _check_identifier(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise _invalid(f"{what} has an invalid name {str(name)[:100]!r}.")
    return name


def _check_graph_json(program: dict[str, Any]) -> None:
    """Every string torch would evaluate, import or resolve, checked against what a plain export contains."""
    guards = program.get("guards_code") or []
    if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        raise _invalid("guards_code is not a list of strings.")
    for guard in guards:
        check_guard_code(guard)
    for item in _walk(program):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("expr_str"), str):
            check_sym_expr(item["expr_str"])
        elif "expr_str" in item:
            raise _invalid("a symbolic expression is not a string.")
        if "target" in item and "inputs" in item and "outputs" in item:
            if not isinstance(item["target"], str):
                raise _invalid("a graph node has a non-string target.")
            check_operator_target(item["target"])
        if isinstance(item.get("as_operator"), str):
            check_operator_target(item["as_operator"])
        for key in ("in_spec", "out_spec"):
            if isinstance(item.get(key), str):
                _check_treespec(item[key])
        if item.get("as_custom_obj") is not None or item.get("custom_obj_values"):
            raise _unsafe("a custom (TorchScript) object")


def _shape(sizes: Any, what: str) -> list[int | str]:
    if not isinstance(sizes, list):
        raise _invalid(f"{what} has no sizes.")
    shape: list[int | str] = []
    for size in sizes:
        if not isinstance(size, dict) or len(size) != 1:
            raise _invalid(f"{what} has a malformed size.")
        if isinstance(size.get("as_int"), int) and not isinstance(size["as_int"], bool):
            if size["as_int"] < 0:
                raise _invalid(f"{what} has a negative size.")
            shape.append(size["as_int"])
        elif isinstance(size.get("as_expr"), dict) and isinstance(size["as_expr"].get("expr_str"), str):
            shape.append(_readable(size["as_expr"]["expr_str"]))
        else:
            raise _invalid(f"{what} has a size that is neither an integer nor a symbolic expression.")
    return shape


def _readable(expr: str) -> str:
    """``Mul(Integer(2), Symbol('s39', positive=True, integer=True))`` as ``Mul(2, s39)``."""
    return _INTEGER.sub(r"\1", _SYMBOL_DIM.sub(r"\1", expr))


def _dtype(meta: dict[str, Any], what: str) -> tuple[str, int]:
    code = meta.get("dtype")
    if not isinstance(code, int) or code not in SCALAR_TYPES:
        raise _invalid(f"{what} has an unknown dtype {str(code)[:20]}.")
    return SCALAR_TYPES[code]


def _tensor_spec(name: str, tensor_values: dict[str, Any]) -> TensorSpec:
    meta = tensor_values.get(name)
    if not isinstance(meta, dict):
        raise _invalid(f"tensor '{name[:100]}' has no metadata in the graph.")
    return TensorSpec(name=name, shape=_shape(meta.get("sizes"), f"tensor '{name}'"), dtype=_dtype(meta, name)[0])


def _user_tensor_name(spec: dict[str, Any], kind: str) -> str:
    arg = spec[kind].get("arg") if isinstance(spec[kind], dict) else None
    if not isinstance(arg, dict) or not isinstance(arg.get("as_tensor"), dict):
        shown = next(iter(arg), "?") if isinstance(arg, dict) else "?"
        raise _invalid(
            f"a model {kind.replace('_', ' ')} is a '{shown}', not a tensor; only tensor inputs and outputs "
            "are supported."
        )
    return _check_identifier(arg["as_tensor"].get("name"), f"a model {kind.replace('_', ' ')}")


def _signature(program: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    try:
        graph_module = program["graph_module"]
        graph = graph_module["graph"]
        tensor_values = graph["tensor_values"]
        signature = graph_module["signature"]
        input_specs = signature["input_specs"]
        output_specs = signature["output_specs"]
    except (KeyError, TypeError) as exc:
        raise _invalid(f"models/*.json lacks {exc} (graph_module.graph / graph_module.signature).") from exc
    if not isinstance(tensor_values, dict) or not isinstance(input_specs, list) or not isinstance(output_specs, list):
        raise _invalid("the graph signature has an unexpected structure.")
    for key in tensor_values:
        _check_identifier(key, "a graph tensor")
    inputs, outputs, parameters = [], [], []
    for spec in input_specs:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise _invalid("an input spec has an unexpected structure.")
        kind = next(iter(spec))
        if kind == "user_input":
            inputs.append(_tensor_spec(_user_tensor_name(spec, kind), tensor_values))
        elif kind == "parameter" and isinstance(spec[kind], dict):
            parameters.append(str(spec[kind].get("parameter_name")))
        elif kind not in {"buffer", "tensor_constant", "constant_input", "token", "custom_obj"}:
            raise _invalid(f"unknown input spec kind '{kind[:50]}'.")
    for spec in output_specs:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise _invalid("an output spec has an unexpected structure.")
        if next(iter(spec)) == "user_output":
            outputs.append(_tensor_spec(_user_tensor_name(spec, "user_output"), tensor_values))
    if not inputs or not outputs:
        raise _invalid("the exported program has no tensor inputs or no tensor outputs.")
    return inputs, outputs, parameters


def _load_json(zf: zipfile.ZipFile, member: ZipMember, cap: int, what: str) -> Any:
    data = read_member(zf, member, max_bytes=cap, what=what)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"{what} is not valid JSON.") from exc


def _payloads(
    config: Any, prefix: str, members: dict[str, ZipMember], folder: str, what: str
) -> dict[str, tuple[list[int | str], bool, str]]:
    """Checked entries of a weights/constants config: fqn -> (shape, is_param, path_name)."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise _invalid(f"{what} has an unexpected structure.")
    entries: dict[str, tuple[list[int | str], bool, str]] = {}
    for fqn, payload in config["config"].items():
        if not isinstance(payload, dict):
            raise _invalid(f"{what} entry '{fqn[:100]}' is not an object.")
        path_name = payload.get("path_name")
        if payload.get("use_pickle") is not False:
            raise InvalidUpload(
                f"The .pt2 archive stores '{fqn[:100]}' as a pickle (a tensor subclass or custom object). "
                f"{PICKLE_REFUSAL}",
                code="pickle_not_accepted",
                details={"tensor": fqn[:100]},
            )
        if not isinstance(path_name, str) or not re.fullmatch(rf"{prefix}[0-9]+", path_name):
            raise _invalid(f"{what} entry '{fqn[:100]}' points at an unexpected file {str(path_name)[:100]!r}.")
        member = members.get(f"{folder}{path_name}")
        meta = payload.get("tensor_meta")
        if member is None or not isinstance(meta, dict):
            raise _invalid(f"{what} entry '{fqn[:100]}' has no data file or no tensor metadata.")
        shape = _shape(meta.get("sizes"), f"tensor '{fqn}'")
        strides = _shape(meta.get("strides"), f"tensor '{fqn}'")
        offset = _shape([meta.get("storage_offset", {"as_int": 0})], f"tensor '{fqn}'")[0]
        if any(isinstance(d, str) for d in [*shape, *strides, offset]):
            raise _invalid(f"weight '{fqn[:100]}' has a symbolic size.")
        _, itemsize = _dtype(meta, fqn)
        if len(strides) != len(shape):
            raise _invalid(f"weight '{fqn[:100]}' has mismatched sizes and strides.")
        numel = math.prod(int(d) for d in shape)
        if numel:
            last = int(offset) + sum((int(d) - 1) * int(s) for d, s in zip(shape, strides, strict=True))
            if (last + 1) * itemsize > member.info.file_size:
                raise _invalid(f"weight '{fqn[:100]}' needs more bytes than its data file holds.")
        entries[fqn] = (shape, payload.get("is_param") is True, path_name)
    return entries


def inspect_pt2(zf: zipfile.ZipFile, members: list[ZipMember], *, size_bytes: int) -> ModelInspection:
    """Inspect a checked torch.export archive; nothing is extracted and no member is unpickled."""
    files = [m for m in members if not m.is_dir]
    root = files[0].name.split("/", 1)[0]
    rel: dict[str, ZipMember] = {m.name[len(root) + 1 :]: m for m in files}
    models = sorted(r for r in rel if re.fullmatch(rf"models/{_NAME}\.json", r))
    if len(models) != 1:
        raise _invalid(f"expected exactly one models/<name>.json, found {len(models)}.")
    model = models[0][len("models/") : -len(".json")]

    for name in rel:
        verdict = _allowed_member(name, model)
        if verdict == "pickle":
            raise InvalidUpload(
                f"The .pt2 archive contains '{name[:100]}', a pickled object torch would unpickle when loading the "
                f"program. {PICKLE_REFUSAL}",
                code="pickle_not_accepted",
                details={"member": name[:100]},
            )
        if verdict is None:
            raise InvalidUpload(
                f"The .pt2 archive contains '{name[:100]}', which is not part of a plain torch.export program "
                "(compiled AOTInductor/ExecuTorch packages and extra payloads are not accepted).",
                code="unsupported_format",
                details={"member": name[:100]},
            )
    archive_format = read_member(zf, rel["archive_format"], max_bytes=64, what="archive_format")
    if archive_format.strip() != b"pt2":
        raise _invalid("archive_format is not 'pt2'.")
    if "byteorder" in rel and read_member(zf, rel["byteorder"], max_bytes=16, what="byteorder").strip() != b"little":
        raise _invalid("only little-endian archives are supported.")

    program = _load_json(zf, rel[f"models/{model}.json"], MAX_MODEL_JSON_BYTES, f"models/{model}.json")
    if not isinstance(program, dict):
        raise _invalid(f"models/{model}.json is not a JSON object.")
    _check_graph_json(program)
    inputs, outputs, _ = _signature(program)

    weights_config = f"data/weights/{model}_weights_config.json"
    if weights_config not in rel:
        raise _invalid(f"{weights_config} is missing.")
    weights = _payloads(
        _load_json(zf, rel[weights_config], MAX_CONFIG_JSON_BYTES, weights_config),
        "weight_",
        rel,
        "data/weights/",
        weights_config,
    )
    constants_config = f"data/constants/{model}_constants_config.json"
    constants = {}
    if constants_config in rel:
        constants = _payloads(
            _load_json(zf, rel[constants_config], MAX_CONFIG_JSON_BYTES, constants_config),
            "tensor_",
            rel,
            "data/constants/",
            constants_config,
        )
    sample_inputs = f"data/sample_inputs/{model}.pt"
    if sample_inputs in rel:
        blob = read_member(zf, rel[sample_inputs], max_bytes=MAX_SAMPLE_INPUTS_BYTES, what=sample_inputs)
        check_torch_tensor_pickle(blob, what=sample_inputs)

    counted: dict[str, int] = {}
    for shape, is_param, path_name in weights.values():
        if is_param:
            counted[path_name] = max(counted.get(path_name, 0), math.prod(int(d) for d in shape))
    buffers = sum(math.prod(int(d) for d in s) for s, p, _ in weights.values() if not p)

    ranges = program.get("range_constraints")
    details: dict[str, Any] = {
        "torch_version": program.get("torch_version") if isinstance(program.get("torch_version"), str) else None,
        "schema_version": program.get("schema_version"),
        "opset_version": program.get("opset_version"),
        "model_name": model,
        "archive_root": root,
        "parameter_tensors": len(counted),
        "buffer_elements": buffers,
        "constant_tensors": len(constants),
        "dynamic_dims": {
            k: {"min": v.get("min_val"), "max": v.get("max_val")}
            for k, v in (ranges.items() if isinstance(ranges, dict) else [])
            if isinstance(k, str) and _SYMBOL.fullmatch(k) and isinstance(v, dict)
        },
        "size_bytes": size_bytes,
    }
    return ModelInspection(
        format="pt2",
        packaging="file",
        inputs=inputs,
        outputs=outputs,
        parameters=sum(counted.values()),
        opset=None,
        details=details,
    )
