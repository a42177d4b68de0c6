"""Inspect an uploaded ``.npz`` dataset from its array headers, and match it against a model's inputs.

Arrays are never loaded: shapes and dtypes come from each ``.npy`` header (``np.lib.format``), object dtypes are
refused from the header before a byte of their pickled payload is read, and the data is only streamed through
once to confirm its length and CRC.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidUpload
from app.inspection.archive import ZipMember, check_zip_members, open_zip
from app.inspection.pickle_scan import looks_like_pickle
from app.inspection.schemas import ArraySpec, DatasetInspection, ModelInspection, TensorSpec
from app.inspection.text_dataset import check_text_dataset_for_model, inspect_jsonl, is_text_dataset, looks_like_jsonl

LABELS = "labels"
SINGLE_INPUT_ALIASES = ("inputs", "input")
DEFAULT_MAX_ARRAYS = 256
DEFAULT_MAX_DATASET_BYTES = 4 * 1024**3
# np.savez_compressed of masks and padding legitimately compresses far more than model weights do.
DEFAULT_DATASET_MAX_RATIO = 1000
_NUMERIC_KINDS = "biufc"
_CHUNK = 1024**2
_ACCEPTED = (
    "an .npz file written by numpy.savez or numpy.savez_compressed, one array per model input, or (for Hugging Face "
    'models with a tokenizer) a JSONL file of {"text": ..., "label": ...} lines'
)


def _invalid(message: str, code: str = "invalid_dataset", **details: Any) -> InvalidUpload:
    return InvalidUpload(message, code=code, details=details)


def _read_header(zf: zipfile.ZipFile, member: ZipMember, key: str) -> ArraySpec:
    try:
        with zf.open(member.info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise _invalid(f"Array '{key}' uses .npy format version {version}; only 1.0 and 2.0 are read.")
            if dtype.hasobject:
                raise _invalid(
                    f"Array '{key}' has an object dtype. Object arrays are stored as pickles, which can execute "
                    "code; save plain numeric arrays instead.",
                    code="object_arrays_not_allowed",
                    array=key,
                )
            if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
                raise _invalid(
                    f"Array '{key}' has dtype {dtype.str!r}; only boolean and numeric arrays are accepted.",
                    array=key,
                    dtype=dtype.str,
                )
            expected = math.prod(shape) * dtype.itemsize
            count = 0
            while chunk := fp.read(min(_CHUNK, expected + 1 - count)):
                count += len(chunk)
                if count > expected:
                    break
    except InvalidUpload:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
        raise _invalid(f"Array '{key}' could not be read: {str(exc)[:300]}", array=key) from exc
    except Exception as exc:  # zlib.error and friends on a damaged member
        raise _invalid(f"Array '{key}' could not be read ({type(exc).__name__}).", array=key) from exc
    if count != expected:
        raise _invalid(
            f"Array '{key}' holds {'more' if count > expected else 'less'} data than its header declares "
            f"(shape {list(shape)}, {dtype.name}).",
            array=key,
        )
    return ArraySpec(shape=[int(d) for d in shape], dtype=dtype.name)


def inspect_dataset(
    path: Path,
    *,
    max_arrays: int = DEFAULT_MAX_ARRAYS,
    max_total_bytes: int = DEFAULT_MAX_DATASET_BYTES,
    max_ratio: float = DEFAULT_DATASET_MAX_RATIO,
) -> DatasetInspection:
    """Inspect the uploaded ``.npz`` (shapes and dtypes from headers; nothing is unpickled) or JSONL text dataset
    (:mod:`app.inspection.text_dataset`) at ``path``, told apart by content."""
    with path.open("rb") as fp:
        head = fp.read(4096)
    if not head:
        raise _invalid(f"The dataset file is empty. Expected {_ACCEPTED}.")
    if looks_like_jsonl(head):
        return inspect_jsonl(path)
    if looks_like_pickle(head):
        raise _invalid(
            f"Pickled datasets are not accepted: loading a pickle can execute code. Upload {_ACCEPTED}.",
            code="pickle_not_accepted",
        )
    if head.startswith(b"\x93NUMPY"):
        raise _invalid(f"This is a single .npy array. Upload {_ACCEPTED}.")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise _invalid(f"The dataset is not an .npz archive. Expected {_ACCEPTED}.")
    try:
        with open_zip(path, max_members=max_arrays) as zf:
            members = check_zip_members(
                zf, max_members=max_arrays, max_total_bytes=max_total_bytes, max_ratio=max_ratio
            )
            arrays: dict[str, ArraySpec] = {}
            for member in members:
                if member.is_dir or "/" in member.name or not member.name.endswith(".npy") or member.name == ".npy":
                    raise _invalid(
                        f"The .npz holds '{member.name[:100]}', which is not a top-level .npy array.",
                        member=member.name[:100],
                    )
                key = member.name[: -len(".npy")]
                arrays[key] = _read_header(zf, member, key)
    except InvalidUpload as exc:
        if exc.code == "invalid_archive":
            raise _invalid(f"The dataset is not a readable .npz archive: {exc.message}", **exc.details) from exc
        raise

    if not arrays:
        raise _invalid(f"The .npz holds no arrays. Expected {_ACCEPTED}.")
    for key, spec in arrays.items():
        if not spec.shape:
            raise _invalid(f"Array '{key}' is a scalar; every array needs a first (sample) dimension.", array=key)
    firsts = {key: spec.shape[0] for key, spec in arrays.items()}
    if len(set(firsts.values())) != 1:
        raise _invalid(
            "All arrays must have the same number of samples (first dimension); got "
            + ", ".join(f"'{k}': {n}" for k, n in sorted(firsts.items()))
            + ".",
            code="invalid_dataset",
            samples=firsts,
        )
    num_samples = next(iter(firsts.values()))
    if num_samples < 1:
        raise _invalid("The dataset has no samples (first dimension is 0).")
    labels = arrays.get(LABELS)
    if labels is not None and (len(labels.shape) != 1 or np.dtype(labels.dtype).kind not in "iu"):
        raise _invalid(
            f"'{LABELS}' must be a 1-D integer array of class indices; got shape {labels.shape} and dtype "
            f"{labels.dtype}.",
            array=LABELS,
        )
    if all(key == LABELS for key in arrays):
        raise _invalid("The dataset holds only labels; it needs at least one input array.")
    return DatasetInspection(num_samples=num_samples, arrays=arrays, has_labels=labels is not None)


def _kind(dtype: str) -> str:
    """'float', 'int' or 'bool' (or the name itself for anything else, which only matches itself)."""
    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        return "float" if "float" in dtype else dtype
    return {"f": "float", "i": "int", "u": "int", "b": "bool", "c": "complex"}.get(kind, dtype)


def _describe(spec: TensorSpec) -> str:
    shape = "not recorded" if spec.shape is None else spec.shape
    return f"'{spec.name}' ({spec.dtype or 'dtype not recorded'}, shape {shape})"


def _mismatch(message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(message, code="dataset_mismatch", details=details)


def check_dataset_for_model(model: ModelInspection, dataset: DatasetInspection) -> dict[str, str]:
    """Map each dataset array to the model input it feeds, or raise ``dataset_mismatch`` saying what is wrong.

    Array names must equal the model's input names; a one-input model also takes a single array called
    ``inputs`` or ``input``. Inputs the model lists in ``details["optional_inputs"]`` (a Hugging Face model's
    ``attention_mask`` and ``token_type_ids``) may be left out. Per-sample shapes must match the input's static
    dimensions (symbolic ones accept any size) and the element kinds must agree (float with float, integer with
    integer, bool with bool). A JSONL text dataset is checked by ``check_text_dataset_for_model``.
    """
    if is_text_dataset(dataset):
        return check_text_dataset_for_model(model, dataset)
    arrays = {k: v for k, v in dataset.arrays.items() if k != LABELS}
    by_name = {spec.name: spec for spec in model.inputs}
    optional = set(model.details.get("optional_inputs") or ())
    mapping: dict[str, str] = {}
    if len(model.inputs) == 1 and len(arrays) == 1:
        (array_name,) = arrays
        only = model.inputs[0]
        if array_name == only.name or array_name in SINGLE_INPUT_ALIASES:
            mapping[array_name] = only.name
    if not mapping:
        missing = [spec for name, spec in by_name.items() if name not in arrays and name not in optional]
        extra = sorted(set(arrays) - set(by_name))
        if missing or extra:
            parts = []
            if missing:
                parts.append("no array for model input " + ", ".join(_describe(s) for s in missing))
            if extra:
                parts.append("array(s) " + ", ".join(f"'{e}'" for e in extra) + " match no model input")
            hint = (
                f" Name the arrays after the model inputs ({', '.join(repr(n) for n in by_name)})"
                + (" or call the single array 'inputs'" if len(by_name) == 1 else "")
                + f"; '{LABELS}' is reserved for class labels."
            )
            raise _mismatch(
                "The dataset does not match the model: " + "; ".join(parts) + "." + hint,
                missing_inputs=[s.name for s in missing],
                unexpected_arrays=extra,
                model_inputs=list(by_name),
            )
        mapping = {name: name for name in arrays}

    for array_name, input_name in mapping.items():
        array, spec = arrays[array_name], by_name[input_name]
        if spec.shape is None or spec.dtype is None:
            continue  # not recorded in the model file (a scripted TorchScript module): the worker's run decides
        expected = spec.shape[1:]
        got = array.shape[1:]
        static_ok = len(spec.shape) >= 1 and len(got) == len(expected)
        if static_ok:
            static_ok = all(isinstance(e, str) or e == g for e, g in zip(expected, got, strict=True))
        if not static_ok:
            raise _mismatch(
                f"Array '{array_name}' has per-sample shape {got} (full shape {array.shape}), but model input "
                f"{_describe(spec)} expects per-sample shape {expected} (the first dimension is the batch; "
                "named dimensions accept any size).",
                array=array_name,
                input=input_name,
                array_shape=array.shape,
                input_shape=spec.shape,
            )
        if _kind(array.dtype) != _kind(spec.dtype):
            raise _mismatch(
                f"Array '{array_name}' holds {array.dtype} values, but model input {_describe(spec)} expects "
                f"{_kind(spec.dtype)} values.",
                array=array_name,
                input=input_name,
                array_dtype=array.dtype,
                input_dtype=spec.dtype,
            )
    return mapping
