"""The contract every model format implements. ``pipeline`` drives it; formats live in their own modules."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from app.jobs.spec import PruneMagnitude, QuantizeFp16, QuantizeInt8Dynamic, QuantizeInt8Static
from worker.compress.types import EvalData, Runner, StepReport

QuantizeStepT = QuantizeInt8Dynamic | QuantizeInt8Static | QuantizeFp16


class FormatBackend(Protocol):
    name: str  # "onnx" | "pt2" | "torchscript" | "hf" | "squeeze": also the output format
    suffix: str  # file suffix of a saved model: ".onnx" | ".pt2" | ".pt" | ".zip" (an hf folder) | ".sqz"

    def open_runner(self, path: Path, device: str) -> Runner:
        """Load the model for inference on ``device`` ("cpu" | "cuda")."""
        ...

    def stored_size(self, path: Path) -> int:
        """Bytes the model takes as stored (ONNX: the .onnx plus its external-data files)."""
        ...

    def count_parameters(self, path: Path) -> tuple[int, int]:
        """(total, nonzero) over the model's floating-point and integer weight tensors."""
        ...

    def example_inputs(self, path: Path, batch_size: int) -> dict[str, np.ndarray]:
        """Random inputs of the right names, dtypes and shapes (dynamic dims: batch_size / small sizes)."""
        ...

    def prune_magnitude(self, src: Path, dst: Path, step: PruneMagnitude) -> StepReport:
        """Write ``src`` with the smallest-magnitude prunable weights zeroed to ``dst``."""
        ...

    def quantize(self, src: Path, dst: Path, step: QuantizeStepT, data: EvalData | None, device: str) -> StepReport:
        """Write a quantized ``src`` to ``dst``; int8_static calibrates on ``data``."""
        ...


def get_backend(fmt: str) -> FormatBackend:
    """The backend for a format name; imports lazily so that only the formats in use load their runtimes."""
    if fmt == "onnx":
        from worker.compress.onnx_format import OnnxBackend

        return OnnxBackend()
    if fmt == "pt2":
        from worker.compress.pt2_format import Pt2Backend

        return Pt2Backend()
    if fmt == "torchscript":
        from worker.compress.torchscript_format import TorchScriptBackend

        return TorchScriptBackend()
    if fmt == "hf":
        from worker.compress.hf_format import HfBackend

        return HfBackend()
    if fmt == "squeeze":
        from worker.compress.squeeze_format import SqueezeBackend

        return SqueezeBackend()
    from worker.compress.types import CompressionError

    raise CompressionError("unsupported_format", f"no backend for format {fmt!r}")
