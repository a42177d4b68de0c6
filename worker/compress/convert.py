"""What every conversion to ONNX ends with: the written file run in ONNX Runtime against the source model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.compress.types import CompressionError, StepReport


def onnx_conversion_report(
    dst: Path, inputs: dict[str, np.ndarray], expected: list[np.ndarray], *, exporter: str, opset: int
) -> StepReport:
    """Load ``dst`` in ONNX Runtime, run it on ``inputs`` and compare with the source model's ``expected`` outputs.

    A model that does not load or run, or that computes something else, fails the step that wrote it
    (``conversion_failed``) rather than the measurement after it.
    """
    from worker.compress.onnx_format import OnnxBackend

    backend = OnnxBackend()
    if Path(str(dst) + ".data").exists():
        raise CompressionError(
            "conversion_failed", "the exporter wrote external data; models over 2 GiB are not supported yet"
        )
    try:
        runner = backend.open_runner(dst, "cpu")
        got = runner(inputs)
    except CompressionError as exc:
        raise CompressionError("conversion_failed", f"the converted ONNX model does not run: {exc.message}") from exc
    if len(got) != len(expected):
        raise CompressionError(
            "conversion_failed", f"the converted model has {len(got)} outputs; the source model has {len(expected)}"
        )
    worst = 0.0
    for a, b in zip(expected, got, strict=True):
        if a.shape != b.shape:
            raise CompressionError(
                "conversion_failed", f"an output of the converted model has shape {b.shape}, expected {a.shape}"
            )
        if a.size:
            worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()))
    samples = len(next(iter(inputs.values())))
    return StepReport(
        op="convert",
        method="onnx",
        details={
            "exporter": exporter,
            "opset": opset,
            "inputs": [{"name": i.name, "shape": i.shape, "type": i.type} for i in runner.session.get_inputs()],
            "bytes": backend.stored_size(dst),
            "checked_samples": samples,
            "max_abs_difference": worst,
            "runtime": runner.runtime,
        },
        notes=[
            f"Converted to ONNX (opset {opset}); later steps and the measurements after this step run in "
            f"{runner.runtime}. On {samples} samples the converted model's outputs differ from the source's by at "
            f"most {worst:.3g}."
        ],
        output_format="onnx",
    )
