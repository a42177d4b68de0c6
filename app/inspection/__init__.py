"""Inspection of uploaded models and datasets: what they are, read from their bytes, without running them.

Torch-free by design (numpy, onnx and the standard library only): the API process never imports torch, never
unpickles an uploaded byte, and never uses one as a path. Every refusal is an ``InvalidUpload`` with a stable code.
"""

from app.inspection.archive import find_onnx_in_dir, safe_extract_zip
from app.inspection.dataset import check_dataset_for_model, inspect_dataset
from app.inspection.model import inspect_model
from app.inspection.schemas import (
    ACCEPTED_MODELS,
    ArraySpec,
    DatasetInspection,
    ModelInspection,
    TensorSpec,
)

__all__ = [
    "ACCEPTED_MODELS",
    "ArraySpec",
    "DatasetInspection",
    "ModelInspection",
    "TensorSpec",
    "check_dataset_for_model",
    "find_onnx_in_dir",
    "inspect_dataset",
    "inspect_model",
    "safe_extract_zip",
]
