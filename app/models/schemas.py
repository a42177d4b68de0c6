from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MODEL_EXAMPLE: dict[str, Any] = {
    "id": "mdl_88801936e32540db99af1ceabc907d0f",
    "name": "digits.onnx",
    "format": "onnx",
    "packaging": "file",
    "size_bytes": 154399,
    "sha256": "9c1d0e3f4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0",
    "created_at": "2026-11-27T23:38:52.120000Z",
    "inputs": [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}],
    "outputs": [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}],
    "parameters": 38282,
    "details": {"opset": 17, "producer": "pytorch"},
}


class TensorSpecPublic(BaseModel):
    name: str
    shape: list[int | str] | None = Field(
        description="Symbolic (dynamic) dimensions are names, static ones integers; null: the file does not record "
        "it (a scripted TorchScript module)."
    )
    dtype: str | None = Field(description="numpy-style name; null: not recorded (TorchScript).")


class ModelPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MODEL_EXAMPLE]})

    id: str
    name: str
    format: str = Field(description="Detected from the content: 'onnx', 'pt2', 'torchscript' or 'hf'.")
    packaging: str = Field(
        description="'file'; 'zip' for an ONNX model with external data or a zipped Hugging Face folder; 'tar' for a "
        "Hugging Face folder in a plain tar."
    )
    size_bytes: int
    sha256: str
    created_at: datetime
    inputs: list[TensorSpecPublic]
    outputs: list[TensorSpecPublic]
    parameters: int
    details: dict[str, Any] = Field(default_factory=dict)


class ModelsPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [MODEL_EXAMPLE], "next_cursor": None}]})

    items: list[ModelPublic]
    next_cursor: str | None
