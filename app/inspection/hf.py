"""Hugging Face model folders (``config.json`` + safetensors weights) uploaded as a ZIP or a plain tar.

Read without torch or transformers (importing transformers' auto-class tables imports torch): ``config.json`` and
``tokenizer_config.json`` are parsed as JSON, the weights are counted from their safetensors headers, and nothing
else is opened. The worker later loads the folder with ``trust_remote_code=False`` and safetensors only; this
inspection refuses up front, with a code a client can act on, what that load would refuse or what could run code:

- ``remote_code_not_allowed``: Python or native files anywhere in the archive, or a config naming custom code
  (``auto_map``, ``custom_pipelines``) in ``config.json``, ``tokenizer_config.json`` and the other configs
  transformers reads;
- ``pickled_weights_not_accepted``: weights only as ``pytorch_model.bin``/``.pt``/``.pth``/``.ckpt`` (pickles);
  a folder with safetensors weights may carry those too: they are listed as ignored and never read;
- ``unsupported_model``: a task this service does not run (see ``TASKS``), or an already quantized checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from app.errors import InvalidUpload
from app.inspection.safetensors_header import parse_safetensors_header
from app.inspection.schemas import ModelInspection, TensorSpec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Files whose presence means the folder can build a tokenizer (fast tokenizer, WordPiece, BPE, SentencePiece).
TOKENIZER_VOCABS = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# Configs transformers reads when it builds a model, tokenizer or processor: none may name custom code.
CODE_BEARING_CONFIGS = (
    CONFIG,
    TOKENIZER_CONFIG,
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
)
CUSTOM_CODE_KEYS = ("auto_map", "custom_pipelines", "trust_remote_code")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".sh", ".ipynb")
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf")
# architectures[0] suffix -> task. The worker loads the matching Auto class (never a class named by the upload).
TASKS = {
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "Model": "feature-extraction",
}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_CONFIG_BYTES = 4 * 1024**2
MAX_LISTED_LABELS = 1000
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.safetensors")
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,99}")
_ARCHITECTURE = re.compile(r"[A-Z][A-Za-z0-9]{0,99}")
_MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class ArchiveFile:
    """One regular file of a checked archive: its normalised name, declared size and an opener for its data."""

    name: str
    size: int
    open: Callable[[], IO[bytes]]


def _refuse(code: str, message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(message, code=code, details=details)


def hf_root(names: list[str]) -> str | None:
    """The folder prefix ("" or "name/") holding ``config.json`` beside model weights, or None if this is not a
    model folder. The folder is the archive's top level or its single root folder. An archive with an ``.onnx``
    file is left to the ONNX inspection (Optimum's exports hold config.json and tokenizer files too)."""
    if any(n.lower().endswith(".onnx") for n in names):
        return None
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    prefixes = [""] + ([f"{next(iter(roots))}/"] if len(roots) == 1 else [])
    for prefix in prefixes:
        if f"{prefix}{CONFIG}" not in names:
            continue
        top = {n[len(prefix) :] for n in names if n.startswith(prefix) and "/" not in n[len(prefix) :]}
        if any(_looks_like_weights(n) for n in top):
            return prefix
    return None


def _looks_like_weights(name: str) -> bool:
    lower = name.lower()
    return (
        lower.endswith((".safetensors", *OTHER_WEIGHT_SUFFIXES))
        or lower == WEIGHTS_INDEX
        or lower.startswith("pytorch_model")
        or lower.endswith((".pt", ".pth", ".ckpt"))
    )


def _json_file(file: ArchiveFile, what: str) -> dict[str, Any]:
    if file.size > MAX_CONFIG_BYTES:
        raise _refuse(
            "archive_too_large", f"{what} is {file.size} bytes; at most {MAX_CONFIG_BYTES} are read.", file=file.name
        )
    with file.open() as fp:
        raw = fp.read(MAX_CONFIG_BYTES + 1)
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _refuse("invalid_model", f"{what} is not valid UTF-8 JSON.", file=file.name) from exc
    if not isinstance(value, dict):
        raise _refuse("invalid_model", f"{what} is not a JSON object.", file=file.name)
    return value


def _custom_code_keys(value: Any, depth: int = 0) -> list[str]:
    """Keys naming custom code anywhere in a parsed config (sub-configs of composite models included)."""
    if depth > _MAX_JSON_DEPTH:
        return ["(nested too deeply)"]
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in CUSTOM_CODE_KEYS:
                found.append(key)
            found += _custom_code_keys(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            found += _custom_code_keys(item, depth + 1)
    return found


def _check_no_code(files: dict[str, ArchiveFile], prefix: str) -> None:
    code = sorted(n for n in files if n.lower().endswith(CODE_SUFFIXES))
    if code:
        raise _refuse(
            "remote_code_not_allowed",
            "The model folder carries code files; models are loaded with trust_remote_code=False, so only "
            "architectures built into transformers are accepted. Remove the code files (and any auto_map).",
            files=code[:20],
        )
    for name in CODE_BEARING_CONFIGS:
        file = files.get(prefix + name)
        if file is None:
            continue
        keys = _custom_code_keys(_json_file(file, name))
        if keys:
            raise _refuse(
                "remote_code_not_allowed",
                f"{name} refers to custom code ({', '.join(sorted(set(keys)))}); models are loaded with "
                "trust_remote_code=False, so only architectures built into transformers are accepted.",
                file=name,
                keys=sorted(set(keys)),
            )


def _weight_files(files: dict[str, ArchiveFile], prefix: str) -> list[str]:
    """The safetensors files transformers will read: model.safetensors, or the shards the index names."""
    top = {n[len(prefix) :] for n in files if n.startswith(prefix) and "/" not in n[len(prefix) :]}
    if WEIGHTS_INDEX in top:
        index = _json_file(files[prefix + WEIGHTS_INDEX], WEIGHTS_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _refuse("invalid_model", f"{WEIGHTS_INDEX} has no weight_map.")
        shards = set()
        for shard in weight_map.values():
            # transformers opens these names inside the folder: plain file names of shards present beside it only.
            if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard) or shard not in top:
                raise _refuse(
                    "invalid_model",
                    f"{WEIGHTS_INDEX} names a shard that is not a .safetensors file beside it.",
                    shard=str(shard)[:200],
                )
            shards.add(shard)
        return sorted(shards)
    if WEIGHTS in top:
        return [WEIGHTS]
    pickled = sorted(n for n in top if n.lower().endswith(PICKLED_SUFFIXES))
    if pickled:
        raise _refuse(
            "pickled_weights_not_accepted",
            "The model folder holds its weights only as pickles (" + ", ".join(pickled[:5]) + "); loading a pickle "
            "can execute code. Save the model with save_pretrained(..., safe_serialization=True) to get "
            "model.safetensors.",
            files=pickled[:20],
        )
    raise _refuse(
        "unsupported_format",
        f"The model folder has no {WEIGHTS} (or {WEIGHTS_INDEX}); only safetensors weights are read.",
        files=sorted(top)[:20],
    )


def task_of(config: dict[str, Any]) -> tuple[str, str, str]:
    """(architecture, model_type, task) from config.json, or ``unsupported_model``."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not _IDENTIFIER.fullmatch(model_type):
        raise _refuse("invalid_model", "config.json has no valid model_type.")
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1 and isinstance(architectures[0], str)):
        raise _refuse(
            "invalid_model",
            'config.json must name exactly one architecture ("architectures": ["BertForSequenceClassification"]).',
        )
    architecture = architectures[0]
    if not _ARCHITECTURE.fullmatch(architecture):
        raise _refuse("invalid_model", "config.json names an architecture that is not a class name.")
    for suffix, task in TASKS.items():
        # A base encoder is "<Name>Model"; heads are "<Name>For<Task>" or "<Name>LMHeadModel" and the like.
        if architecture.endswith(suffix) and (suffix != "Model" or not re.search("For|Head", architecture)):
            return architecture, model_type, task
    raise _refuse(
        "unsupported_model",
        f"{architecture}: only sequence classifiers (*ForSequenceClassification), token classifiers "
        "(*ForTokenClassification) and base encoders (*Model) are supported.",
        architecture=architecture,
    )


def _parameters(files: dict[str, ArchiveFile], names: list[str]) -> tuple[int, list[str]]:
    total = 0
    dtypes: set[str] = set()
    for name in names:
        file = files[name]
        with file.open() as fp:
            header = parse_safetensors_header(fp, file.size)  # hostile headers: invalid_safetensors
        for info in header.values():
            total += math.prod(info["shape"])
            dtypes.add(info["dtype"])
    return total, sorted(dtypes)


def _labels(config: dict[str, Any], task: str) -> dict[str, Any]:
    if task == "feature-extraction":
        return {}
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            labels = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError) as exc:
            raise _refuse("invalid_model", "config.json: id2label keys must be class indices.") from exc
        num_labels = len(labels)
    else:
        raw = config.get("num_labels", 2)
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
            raise _refuse("invalid_model", "config.json: num_labels must be a positive integer.")
        num_labels, labels = raw, {i: f"LABEL_{i}" for i in range(raw)}
    if sorted(labels) != list(range(num_labels)):
        raise _refuse("invalid_model", "config.json: id2label must number the classes 0..n-1.")
    details: dict[str, Any] = {"num_labels": num_labels}
    if num_labels <= MAX_LISTED_LABELS:
        details["labels"] = [labels[i] for i in range(num_labels)]
    return details


def _inputs(config: dict[str, Any], tokenizer_config: dict[str, Any] | None) -> list[str]:
    declared = (tokenizer_config or {}).get("model_input_names")
    if isinstance(declared, list) and declared and all(isinstance(n, str) for n in declared):
        names = [n for n in TEXT_INPUTS if n in declared]
        if "input_ids" in names:
            return names
    type_vocab = config.get("type_vocab_size")
    with_types = isinstance(type_vocab, int) and not isinstance(type_vocab, bool) and type_vocab > 1
    return ["input_ids", "attention_mask", *(["token_type_ids"] if with_types else [])]


def inspect_hf(files: dict[str, ArchiveFile], prefix: str, *, packaging: str, size_bytes: int) -> ModelInspection:
    """Inspect the model folder at ``prefix`` among ``files`` (a checked archive's regular files)."""
    _check_no_code(files, prefix)
    config = _json_file(files[prefix + CONFIG], CONFIG)
    if "quantization_config" in config:
        raise _refuse(
            "unsupported_model",
            "This checkpoint is already quantized (config.json has quantization_config); upload the floating-point "
            "model and quantize it with a job.",
        )
    weights = _weight_files(files, prefix)
    architecture, model_type, task = task_of(config)
    parameters, dtypes = _parameters(files, [prefix + w for w in weights])
    top = sorted(n[len(prefix) :] for n in files if n.startswith(prefix) and "/" not in n[len(prefix) :])
    tokenizer_files = [n for n in top if n in TOKENIZER_VOCABS or n in (TOKENIZER_CONFIG, "special_tokens_map.json")]
    has_tokenizer = any(n in TOKENIZER_VOCABS for n in top)
    tokenizer_config = (
        _json_file(files[prefix + TOKENIZER_CONFIG], TOKENIZER_CONFIG) if TOKENIZER_CONFIG in top else None
    )
    inputs = _inputs(config, tokenizer_config)
    hidden = config.get("hidden_size")
    labels = _labels(config, task)
    if task == "sequence-classification":
        outputs = [TensorSpec(name="logits", shape=["batch", labels["num_labels"]], dtype="float32")]
    elif task == "token-classification":
        outputs = [TensorSpec(name="logits", shape=["batch", "sequence", labels["num_labels"]], dtype="float32")]
    else:
        width: int | str = hidden if isinstance(hidden, int) and not isinstance(hidden, bool) else "hidden"
        outputs = [TensorSpec(name="last_hidden_state", shape=["batch", "sequence", width], dtype="float32")]
    ignored = sorted(n for n in files if n.startswith(prefix) and n[len(prefix) :].lower().endswith(PICKLED_SUFFIXES))
    max_positions = config.get("max_position_embeddings")
    details: dict[str, Any] = {
        "model_type": model_type,
        "architecture": architecture,
        "task": task,
        "root": prefix.rstrip("/"),
        "weights_files": weights,
        "weight_dtypes": dtypes,
        "tokenizer": has_tokenizer,
        "tokenizer_files": tokenizer_files,
        "optional_inputs": [n for n in inputs if n != "input_ids"],
        "max_position_embeddings": max_positions if isinstance(max_positions, int) else None,
        "archive_bytes": size_bytes,
        **labels,
    }
    if ignored:
        details["ignored_files"] = ignored[:50]  # pickled weights beside the safetensors: never read
    return ModelInspection(
        format="hf",
        packaging=packaging,  # type: ignore[arg-type]
        inputs=[TensorSpec(name=n, shape=["batch", "sequence"], dtype="int64") for n in inputs],
        outputs=outputs,
        parameters=parameters,
        opset=None,
        details=details,
    )
