from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class TensorSpecPublic(BaseModel):
    name: str
    shape: list[int | str] = Field(description="Symbolic (dynamic) dimensions are names, static ones integers.")
    dtype: str


class ModelPublic(BaseModel):
    id: str
    name: str
    format: str = Field(description="Detected from the content: 'onnx' or 'pt2'.")
    packaging: str = Field(description="'file', or 'zip' for an ONNX model with external data.")
    size_bytes: int
    sha256: str
    created_at: datetime
    inputs: list[TensorSpecPublic]
    outputs: list[TensorSpecPublic]
    parameters: int
    details: dict[str, Any] = Field(default_factory=dict)


class ModelsPublic(BaseModel):
    items: list[ModelPublic]
    next_cursor: str | None
