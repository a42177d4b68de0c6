"""What inspection reports about an uploaded model or dataset. Plain pydantic models, free of torch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ACCEPTED_MODELS = (
    "a single .onnx file, a .zip holding one .onnx file and its external-data files, a torch.export "
    "archive (.pt2, written by torch.export.save), a TorchScript archive (written by torch.jit.save), or a "
    "Hugging Face model folder (config.json + model.safetensors, tokenizer files optional) as a .zip or plain .tar"
)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Frozen):
    """One model input or output. Symbolic (dynamic) dimensions are strings, static ones integers."""

    name: str
    shape: list[int | str] | None = Field(description="None: the file does not record it (TorchScript).")
    dtype: str | None = Field(
        description='numpy-style name: "float32", "int64", "bool", "bfloat16", ...; None: not recorded.'
    )


class ModelInspection(_Frozen):
    format: Literal["onnx", "pt2", "torchscript", "hf"]
    packaging: Literal["file", "zip", "tar"]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: int = Field(
        description="Elements in the model's weights (pt2, TorchScript: parameters; ONNX: initializers)."
    )
    opset: int | None = Field(None, description="ONNX default-domain opset; None for the other formats.")
    details: dict[str, Any] = Field(default_factory=dict)


class ArraySpec(_Frozen):
    shape: list[int]
    dtype: str = Field(description='numpy dtype name, or "text" for a JSONL dataset\'s strings.')
    values: list[int] | list[str] | None = Field(
        None, description="JSONL labels only: the distinct label values, sorted (None past 1000 of them)."
    )


class DatasetInspection(_Frozen):
    num_samples: int
    arrays: dict[str, ArraySpec]
    has_labels: bool
