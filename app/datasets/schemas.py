from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class ArrayInfo(BaseModel):
    shape: list[int]
    dtype: str


class DatasetPublic(BaseModel):
    id: str
    name: str
    num_samples: int
    arrays: dict[str, ArrayInfo]
    has_labels: bool
    sha256: str
    size_bytes: int
    created_at: datetime


class DatasetsPublic(BaseModel):
    items: list[DatasetPublic]
    next_cursor: str | None
