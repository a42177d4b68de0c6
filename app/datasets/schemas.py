from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DATASET_EXAMPLE: dict[str, Any] = {
    "id": "dst_5f0c2a61d3b74e0e9a4c8e2b7d1f3a90",
    "name": "digits.npz",
    "format": "npz",
    "num_samples": 397,
    "arrays": {"input": {"shape": [397, 1, 8, 8], "dtype": "float32"}, "labels": {"shape": [397], "dtype": "int64"}},
    "has_labels": True,
    "sha256": "4e3d2c1b0a9f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c6b5a49382716051",
    "size_bytes": 102430,
    "created_at": "2026-11-27T23:38:53.004000Z",
}


class ArrayInfo(BaseModel):
    shape: list[int]
    dtype: str = Field(description='numpy dtype name; "text" for the strings of a JSONL dataset.')


class DatasetPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [DATASET_EXAMPLE]})

    id: str
    name: str
    format: Literal["npz", "jsonl"] = Field(
        "npz", description="npz: one array per model input; jsonl: texts tokenized by the model's tokenizer."
    )
    num_samples: int
    arrays: dict[str, ArrayInfo] = Field(
        description='npz: the arrays; jsonl: "text" (and "text_pair") with dtype "text", and "labels".'
    )
    has_labels: bool
    label_values: list[int] | list[str] | None = Field(
        None, description="jsonl only: the distinct labels (class indices or names), sorted; None past 1000."
    )
    sha256: str
    size_bytes: int
    created_at: datetime


class DatasetsPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [DATASET_EXAMPLE], "next_cursor": None}]})

    items: list[DatasetPublic]
    next_cursor: str | None
