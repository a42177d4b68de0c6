"""JSONL text datasets for Hugging Face models: one ``{"text": ..., "label": ...}`` object per line.

Parsed as JSON only (never evaluated), line by line with a bounded line length, so a hostile file costs one pass of
``json.loads`` over at most ``MAX_LINE_BYTES`` at a time. The API keeps only counts and the set of labels; the
worker's confined child parses the same file with the same code (:func:`iter_records`) and tokenizes the texts with
the model's own tokenizer.

Each line: ``text`` (a string, required), ``text_pair`` (a string, for pair tasks such as entailment) and ``label``
(a class index >= 0, or a class name from the model's ``id2label``). Every line has the same keys; blank lines are
skipped. A bad line is refused with its 1-based line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import InvalidUpload
from app.inspection.schemas import ArraySpec, DatasetInspection, ModelInspection

TEXT = "text"
TEXT_PAIR = "text_pair"
LABEL = "label"
LABELS = "labels"  # the array name, as in .npz datasets
TEXT_DTYPE = "text"
KEYS = (TEXT, TEXT_PAIR, LABEL)
MAX_LINE_BYTES = 1024**2
MAX_RECORDS = 1_000_000
MAX_LABEL_CHARS = 256
MAX_LISTED_LABELS = 1000
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class TextRecord:
    line: int
    text: str
    text_pair: str | None
    label: int | str | None


def looks_like_jsonl(head: bytes) -> bool:
    """The file starts (after an optional UTF-8 BOM and whitespace) with a JSON object."""
    return head.removeprefix(_BOM).lstrip(b" \t\r\n").startswith(b"{")


def _bad_line(line: int, message: str, reason: str) -> InvalidUpload:
    return InvalidUpload(
        f"line {line}: {message}", code="invalid_dataset", details={"line": line, "reason": reason, "format": "jsonl"}
    )


def _record(line: int, raw: bytes) -> TextRecord:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _bad_line(line, "is not valid UTF-8.", "encoding") from exc
    except (ValueError, RecursionError) as exc:
        raise _bad_line(line, f"is not valid JSON ({str(exc)[:200]}).", "json") from exc
    if not isinstance(value, dict):
        raise _bad_line(line, 'must be a JSON object such as {"text": "...", "label": 0}.', "not_an_object")
    unknown = sorted(k for k in value if k not in KEYS)
    if unknown:
        shown = ", ".join(repr(k[:50]) for k in unknown[:5])
        raise _bad_line(line, f"unexpected key(s) {shown}; allowed: {', '.join(KEYS)}.", "key")
    text = value.get(TEXT)
    if not isinstance(text, str):
        raise _bad_line(line, f'needs "{TEXT}" as a string.', "text")
    pair = value.get(TEXT_PAIR)
    if TEXT_PAIR in value and not isinstance(pair, str):
        raise _bad_line(line, f'"{TEXT_PAIR}" must be a string.', "text_pair")
    label = value.get(LABEL)
    if LABEL in value:
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise _bad_line(line, f'"{LABEL}" must be a class index (integer >= 0) or a class name.', "label")
        if isinstance(label, int) and not 0 <= label < 2**31:
            raise _bad_line(line, f'"{LABEL}" must be a class index >= 0.', "label")
        if isinstance(label, str) and not 0 < len(label) <= MAX_LABEL_CHARS:
            raise _bad_line(line, f'a class name in "{LABEL}" must have 1-{MAX_LABEL_CHARS} characters.', "label")
    return TextRecord(line, text, pair if TEXT_PAIR in value else None, label if LABEL in value else None)


def iter_records(path: Path, *, limit: int | None = None) -> Iterator[TextRecord]:
    """The file's records in order (at most ``limit``); ``invalid_dataset`` names the first bad line."""
    first: TextRecord | None = None
    count = 0
    with path.open("rb") as fp:
        line = 0
        while True:
            raw = fp.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            line += 1
            if len(raw) > MAX_LINE_BYTES:
                raise _bad_line(line, f"is longer than {MAX_LINE_BYTES} bytes.", "line_too_long")
            if line == 1:
                raw = raw.removeprefix(_BOM)
            if not raw.strip():
                continue
            record = _record(line, raw)
            if first is None:
                first = record
            else:
                _same_shape(first, record)
            count += 1
            if count > MAX_RECORDS:
                raise InvalidUpload(
                    f"The dataset has more than {MAX_RECORDS} records.",
                    code="dataset_too_large",
                    details={"max_records": MAX_RECORDS},
                )
            yield record
            if limit is not None and count >= limit:
                return
    if first is None:
        raise InvalidUpload("The JSONL dataset has no records.", code="invalid_dataset", details={"format": "jsonl"})


def _same_shape(first: TextRecord, record: TextRecord) -> None:
    for key, a, b in ((TEXT_PAIR, first.text_pair, record.text_pair), (LABEL, first.label, record.label)):
        if (a is None) != (b is None):
            has = "has" if b is not None else "lacks"
            raise _bad_line(
                record.line, f'{has} "{key}" but line {first.line} does not; every line needs the same keys.', "keys"
            )
    if first.label is not None and type(first.label) is not type(record.label):
        raise _bad_line(
            record.line,
            f'"{LABEL}" is a {type(record.label).__name__} but line {first.line} has a {type(first.label).__name__}; '
            "use class indices or class names throughout.",
            "label",
        )


def inspect_jsonl(path: Path) -> DatasetInspection:
    """Count the records and collect the label set; the texts themselves are not kept."""
    count = 0
    labels: set[Any] = set()
    sample: TextRecord | None = None
    for record in iter_records(path):
        count += 1
        sample = sample or record
        if record.label is not None and len(labels) <= MAX_LISTED_LABELS:
            labels.add(record.label)
    assert sample is not None
    arrays = {TEXT: ArraySpec(shape=[count], dtype=TEXT_DTYPE)}
    if sample.text_pair is not None:
        arrays[TEXT_PAIR] = ArraySpec(shape=[count], dtype=TEXT_DTYPE)
    if sample.label is not None:
        arrays[LABELS] = ArraySpec(
            shape=[count],
            dtype="int64" if isinstance(sample.label, int) else TEXT_DTYPE,
            values=sorted(labels) if len(labels) <= MAX_LISTED_LABELS else None,
        )
    return DatasetInspection(num_samples=count, arrays=arrays, has_labels=sample.label is not None)


def is_text_dataset(dataset: DatasetInspection) -> bool:
    spec = dataset.arrays.get(TEXT)
    return spec is not None and spec.dtype == TEXT_DTYPE


def _mismatch(message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(message, code="dataset_mismatch", details=details)


def check_text_dataset_for_model(model: ModelInspection, dataset: DatasetInspection) -> dict[str, str]:
    """A JSONL dataset feeds an ``hf`` model with a tokenizer; its labels must be the model's classes.

    Returns the mapping the worker reads: ``{"text": "text"}`` (and ``"text_pair"``), meaning "tokenize these".
    """
    if model.format != "hf":
        raise _mismatch(
            f"A JSONL text dataset feeds Hugging Face model folders (format hf), which bring their tokenizer; this "
            f"model is {model.format}. Tokenize the texts yourself and upload an .npz with one array per model input.",
            model_format=model.format,
        )
    if not model.details.get("tokenizer"):
        raise _mismatch(
            "The model folder has no tokenizer files (tokenizer.json, vocab.txt, ...), so its texts cannot be "
            "tokenized. Add the tokenizer (tokenizer.save_pretrained) to the folder, or upload an .npz of token ids.",
            reason="no_tokenizer",
        )
    labels = dataset.arrays.get(LABELS)
    if labels is not None:
        task = model.details.get("task")
        if task != "sequence-classification":
            raise _mismatch(
                f"JSONL labels are one class per text, which only a sequence classifier predicts; this model's task "
                f'is {task}. Leave "label" out to measure fidelity to the original model instead.',
                task=task,
            )
        names = model.details.get("labels")
        num_labels = int(model.details.get("num_labels", 0))
        if labels.dtype == TEXT_DTYPE and labels.values is not None and isinstance(names, list):
            unknown = sorted(str(v) for v in labels.values if v not in names)
            if unknown:
                raise _mismatch(
                    f"Label(s) {', '.join(repr(u) for u in unknown[:10])} are not classes of the model; its "
                    f"id2label names {', '.join(repr(n) for n in names[:20])}. Use those names or class indices.",
                    unknown_labels=unknown[:50],
                    model_labels=names[:MAX_LISTED_LABELS],
                )
        if labels.dtype != TEXT_DTYPE and labels.values is not None:
            out_of_range = [v for v in labels.values if isinstance(v, int) and v >= num_labels]
            if out_of_range:
                raise _mismatch(
                    f"Label(s) {out_of_range[:10]} are outside the model's {num_labels} classes (0..{num_labels - 1}).",
                    out_of_range=out_of_range[:50],
                    num_labels=num_labels,
                )
    return {name: name for name in (TEXT, TEXT_PAIR) if name in dataset.arrays}
