"""Inspect an ONNX model without running it: parse, sanity-check, check domains and external-data locations."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from app.errors import InvalidUpload
from app.inspection.schemas import ACCEPTED_MODELS, ModelInspection, TensorSpec

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
_PROTOBUF_LIMIT = 2 * 1024**3
# int64 initializers are shapes, axes and indices, not weights.
_NOT_WEIGHTS = {onnx.TensorProto.INT64}
_SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}


def _invalid(message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(message, code="invalid_model", details=details)


def dtype_name(elem_type: int) -> str:
    """numpy-style name of an ONNX tensor element type ("float32", "int64", "bfloat16", "string")."""
    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except Exception:
        return (
            onnx.TensorProto.DataType.Name(elem_type).lower()
            if elem_type in onnx.TensorProto.DataType.values()
            else "unknown"
        )


def _value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSpec(name=value.name, shape=[], dtype=kind or "unknown")
    tensor_type = value.type.tensor_type
    shape: list[int | str] = []
    if tensor_type.HasField("shape"):
        for i, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                shape.append(dim.dim_param)
            else:
                shape.append(f"{value.name}_dim{i}")
    return TensorSpec(name=value.name, shape=shape, dtype=dtype_name(tensor_type.elem_type))


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies) below it."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for g in _graphs(model.graph):
        yield from g.node
    for fn in model.functions:
        for node in fn.node:
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    for g in _graphs(attr.g):
                        yield from g.node
                for sub in attr.graphs:
                    for g in _graphs(sub):
                        yield from g.node


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that may carry data: initializers, sparse initializers, tensor attributes."""
    for g in _graphs(model.graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in _all_nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices


def _check_domains(model: onnx.ModelProto) -> None:
    # A call to a model-local function is fine: the function's own nodes are checked like any other.
    local_functions = {(fn.domain, fn.name) for fn in model.functions}
    bad: set[str] = set()
    for node in _all_nodes(model):
        if node.domain in ALLOWED_DOMAINS or (node.domain, node.op_type) in local_functions:
            continue
        bad.add(f"{node.domain}::{node.op_type}")
    if bad:
        shown = sorted(bad)
        raise InvalidUpload(
            f"The model uses operators from domains outside {sorted({d or 'ai.onnx' for d in ALLOWED_DOMAINS})}: "
            f"{', '.join(shown[:10])}. Custom operators need code the service will not load.",
            code="unsupported_operator_domain",
            details={"operators": shown[:50], "allowed_domains": sorted(ALLOWED_DOMAINS)},
        )


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    count = math.prod(int(d) for d in tensor.dims)
    name = (
        onnx.TensorProto.DataType.Name(tensor.data_type)
        if tensor.data_type in onnx.TensorProto.DataType.values()
        else ""
    )
    if name in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[name] + 7) // 8
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        return count * int(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    except Exception:
        return None


def _location_problem(location: str) -> str | None:
    """Why an external-data ``location`` is unsafe, or None. Checked on the string, before touching the disk."""
    if not location:
        return "empty location"
    if "\x00" in location or any(ord(c) < 0x20 for c in location):
        return "control character in location"
    if "\\" in location:
        return "backslash in location"
    if location.startswith("/") or (len(location) >= 2 and location[1] == ":"):
        return "absolute location"
    if any(seg == ".." for seg in location.split("/")):
        return "'..' in location"
    return None


def _external_refs(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, dict[str, str]]]:
    refs = []
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            refs.append((tensor, {e.key: e.value for e in tensor.external_data}))
    return refs


def _outside(location: str, reason: str, tensor: str) -> InvalidUpload:
    return InvalidUpload(
        f"Tensor '{tensor}' stores its data at '{location[:200]}', outside the model's folder ({reason}). "
        "External-data files must sit next to the .onnx file inside the uploaded .zip.",
        code="external_data_outside_model",
        details={"tensor": tensor, "location": location[:200], "reason": reason},
    )


def _check_external_data(model: onnx.ModelProto, model_path: Path, root: Path | None) -> list[str]:
    """Validate every external-data reference; return the data files used (relative to the model's folder).

    ``root`` is the extraction folder of a zipped upload; None for a single uploaded .onnx, which may not
    reference external data at all.
    """
    refs = _external_refs(model)
    for tensor, entries in refs:
        problem = _location_problem(entries.get("location", ""))
        if problem:
            raise _outside(entries.get("location", ""), problem, tensor.name)
    if not refs:
        return []
    if root is None:
        files = sorted({entries["location"] for _, entries in refs})
        raise InvalidUpload(
            f"The model keeps {len(refs)} tensors in external data files ({', '.join(files[:5])}) that were not "
            "uploaded. Upload a .zip containing the .onnx file and its external data files.",
            code="external_data_missing",
            details={"external_data_files": files[:50]},
        )
    real_root = os.path.realpath(root)
    model_dir = os.path.dirname(os.path.realpath(model_path))
    used: set[str] = set()
    sizes: dict[str, int] = {}
    for tensor, entries in refs:
        location = entries["location"]
        joined = os.path.normpath(os.path.join(model_dir, *location.split("/")))
        resolved = os.path.realpath(joined)
        if os.path.commonpath([real_root, resolved]) != real_root:
            raise _outside(location, "resolves outside the archive", tensor.name)
        if resolved != joined or os.path.islink(joined):
            raise _outside(location, "symbolic link", tensor.name)
        if not os.path.isfile(resolved):
            raise InvalidUpload(
                f"Tensor '{tensor.name}' stores its data in '{location[:200]}', which is not in the archive.",
                code="external_data_missing",
                details={"tensor": tensor.name, "location": location[:200]},
            )
        size = sizes.setdefault(resolved, os.path.getsize(resolved))
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError as exc:
            raise _invalid(f"Tensor '{tensor.name}' has a non-numeric external-data offset or length.") from exc
        expected = _tensor_bytes(tensor)
        if offset < 0 or (length is not None and length < 0):
            raise _invalid(f"Tensor '{tensor.name}' has a negative external-data offset or length.")
        if length is not None and expected is not None and length != expected:
            raise _invalid(
                f"Tensor '{tensor.name}' declares {length} bytes of external data; its shape and type need {expected}.",
                tensor=tensor.name,
            )
        needed = length if length is not None else expected
        if needed is not None and offset + needed > size:
            raise InvalidUpload(
                f"Tensor '{tensor.name}' reads bytes {offset}..{offset + needed} of '{location[:200]}', which has "
                f"only {size} bytes.",
                code="external_data_out_of_range",
                details={"tensor": tensor.name, "location": location[:200], "file_size": size},
            )
        used.add(Path(os.path.relpath(resolved, model_dir)).as_posix())
    return sorted(used)


def load_onnx_proto(path: Path) -> onnx.ModelProto:
    """Parse ``path`` as an ONNX ModelProto (no external data loaded), with cheap sanity checks."""
    size = path.stat().st_size
    if size >= _PROTOBUF_LIMIT:
        raise _invalid("An .onnx protobuf must be under 2 GiB; store large weights as external data in a .zip.")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise _invalid(
            f"The file is not a model this service accepts: it does not parse as ONNX ({type(exc).__name__}). "
            f"Accepted: {ACCEPTED_MODELS}."
        ) from exc
    except Exception as exc:  # protobuf raises a variety of errors on hostile input
        raise _invalid(
            f"The file is not a model this service accepts ({type(exc).__name__}). Accepted: {ACCEPTED_MODELS}."
        ) from exc
    if not model.HasField("graph"):
        raise _invalid(f"The file is not a valid ONNX model: it has no graph. Accepted: {ACCEPTED_MODELS}.")
    if len(model.graph.node) == 0:
        raise _invalid("The ONNX model's graph has no nodes.")
    if not model.opset_import:
        raise _invalid("The ONNX model declares no opset.")
    return model


def inspect_onnx(
    path: Path, *, root: Path | None, packaging: str, extra_details: dict[str, Any] | None = None
) -> ModelInspection:
    """Inspect the ONNX file at ``path``. ``root``: the extraction folder of a zipped upload, else None."""
    model = load_onnx_proto(path)
    _check_domains(model)
    data_files = _check_external_data(model, path, root)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise _invalid(f"The ONNX model fails the ONNX checker: {str(exc)[:500]}") from exc

    initializer_names = {t.name for t in model.graph.initializer}
    initializer_names.update(s.values.name for s in model.graph.sparse_initializer)
    inputs = [_value_spec(v) for v in model.graph.input if v.name not in initializer_names]
    outputs = [_value_spec(v) for v in model.graph.output]
    if not inputs or not outputs:
        raise _invalid("The ONNX model has no graph inputs or no graph outputs.")
    parameters = sum(
        math.prod(int(d) for d in t.dims) for t in model.graph.initializer if t.data_type not in _NOT_WEIGHTS
    )
    parameters += sum(math.prod(int(d) for d in s.values.dims) for s in model.graph.sparse_initializer)
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    details: dict[str, Any] = {
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "ir_version": int(model.ir_version),
        "opset_imports": opsets,
        "node_count": len(model.graph.node),
        "initializer_count": len(model.graph.initializer),
        "external_data_files": data_files,
        "size_bytes": path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files),
    }
    details.update(extra_details or {})
    return ModelInspection(
        format="onnx",
        packaging=packaging,  # type: ignore[arg-type]
        inputs=inputs,
        outputs=outputs,
        parameters=int(parameters),
        opset=opsets.get("ai.onnx"),
        details=details,
    )
