"""ONNX models: inspect, run, prune and quantize them with onnx and ONNX Runtime.

Everything a user's model can make onnx or ONNX Runtime raise becomes a ``CompressionError`` with a code the job
report can show. Intermediate files live in a scratch folder beside the destination and are removed afterwards
(ONNX Runtime's quantizers also keep some scratch in self-deleting temporary folders of their own).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from app.jobs.spec import (
    PruneMagnitude,
    PruneStructured,
    PruneWanda,
    QuantizeFp16,
    QuantizeInt4WeightOnly,
    QuantizeInt8Dynamic,
    QuantizeInt8Static,
    QuantizeInt8WeightOnly,
    parse_pattern,
)
from worker.compress.backend import QuantizeStepT
from worker.compress.pruning import step_masks
from worker.compress.types import CompressionError, EvalData, StepContext, StepReport

_PROTOBUF_LIMIT = 2**31 - 2**20  # stay clear of protobuf's 2 GiB message limit
_MAX_MESSAGE = 2000

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_INT8_TYPES = {TensorProto.INT8, TensorProto.UINT8}
_PRUNABLE_SLOTS = {"Conv": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}

# Where a quantized weight's zero point sits, and along which axis it varies when per channel:
# (op_type, weight slot) -> (zero-point slot, axis). "attr" reads the node's ``axis`` attribute (default 1),
# "transB" picks 0 or 1 from QGemm's ``transB``.
_WEIGHT_ZERO_POINTS: dict[tuple[str, int], tuple[int, int | str]] = {
    ("DequantizeLinear", 0): (2, "attr"),
    ("ConvInteger", 1): (3, 0),
    ("MatMulInteger", 1): (3, -1),
    ("QLinearConv", 3): (5, 0),
    ("QLinearMatMul", 3): (5, -1),
    ("DynamicQuantizeMatMul", 1): (3, -1),
    ("MatMulIntegerToFloat", 1): (5, -1),
    ("QGemm", 3): (5, "transB"),
}


# ----------------------------------------------------------------------------------------------------------
# Running


@dataclass
class _InputSpec:
    name: str
    dtype: np.dtype
    shape: list[int | None]  # None: symbolic or unknown


def session_options() -> ort.SessionOptions:
    """Session options for every ONNX Runtime session a job opens: errors-only logging, and as many intra-op
    threads as the worker gave the job (``OMP_NUM_THREADS``, set by ``squeeze worker --threads``), so parallel jobs
    on one machine do not each start a thread per core."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; fallback notices would flood the worker log
    threads = os.environ.get("OMP_NUM_THREADS", "")
    # Set even without the variable (ORT's own default is a thread per physical core), so the latency reports
    # can say how many threads they were measured with.
    options.intra_op_num_threads = int(threads) if threads.isdigit() and int(threads) > 0 else cpu_cores()
    return options


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0))


class OnnxRunner:
    """An ONNX Runtime session behind the ``Runner`` protocol; inputs are cast to the dtypes the model wants."""

    def __init__(self, session: ort.InferenceSession, device: str) -> None:
        self.session = session
        self.device = device
        self.runtime = f"onnxruntime {ort.__version__} {session.get_providers()[0]}"
        self.inputs = [_ort_input_spec(i) for i in session.get_inputs()]
        first = self.inputs[0].shape if self.inputs else []
        self.fixed_batch: int | None = first[0] if first else None
        self.keep_alive: list[object] = []  # buffers the session reads in place (see OnnxWeightSwapper)

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [i.name for i in self.inputs if i.name not in inputs]
        if missing:
            raise CompressionError(
                "input_mismatch",
                f"the data has no array for model input(s) {missing}; "
                f"the model expects {[i.name for i in self.inputs]}",
            )
        feed = {i.name: np.ascontiguousarray(inputs[i.name], dtype=i.dtype) for i in self.inputs}
        return list(self.session.run(None, feed))


class OnnxWeightSwapper:
    """ONNX Runtime sessions on one model file with named initializers replaced, via ``SessionOptions.add_initializer``.

    ONNX Runtime applies such a replacement after its graph optimizations, and silently drops it for an
    initializer that an optimization has already consumed (constant-folded into a Transpose's output, fused into
    another node) or for a name it does not know, so the sessions here run the graph unoptimized
    (``ORT_DISABLE_ALL``: every initializer is used as stored), and only top-level initializers are replaced
    (subgraph ones are refused, the caller then writes the model). Results must be compared with :meth:`open`
    of no replacement, which runs the same unoptimized graph, not with an optimized session.
    """

    def __init__(self, path: Path, initializers: set[str]) -> None:
        self.path = path
        self.initializers = initializers

    def open(self, weights: dict[str, np.ndarray]) -> OnnxRunner | None:
        """A CPU runner with ``weights`` (same dtype and shape as stored) in place; None if one is not a top-level
        initializer."""
        if not weights.keys() <= self.initializers:
            return None
        options = session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # The session reads these buffers without copying them: they must outlive it (kept on the runner).
        values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)) for name, w in weights.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own exception types; its message is what the user can act on
            raise CompressionError("invalid_model", _message("ONNX Runtime cannot load the model", exc)) from exc
        runner = OnnxRunner(session, "cpu")
        runner.keep_alive = list(values.values())
        return runner


def _ort_input_spec(arg: Any) -> _InputSpec:
    match = re.fullmatch(r"tensor\((\w+)\)", arg.type)
    dtype = _ORT_DTYPES.get(match.group(1)) if match else None
    if dtype is None:
        raise CompressionError(
            "unsupported_input_type",
            f"model input {arg.name!r} has type {arg.type}; only numeric and bool tensors can be fed",
        )
    shape = [d if isinstance(d, int) and d > 0 else None for d in (arg.shape or [])]
    return _InputSpec(arg.name, np.dtype(dtype), shape)


_ORT_DTYPES: dict[str, type] = {
    "float": np.float32,
    "float16": np.float16,
    "double": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "bool": np.bool_,
}


# ----------------------------------------------------------------------------------------------------------
# The backend


class OnnxBackend:
    """``FormatBackend`` for ``.onnx`` files, run with ONNX Runtime (CPU, or CUDA when the job asks for it)."""

    name = "onnx"
    suffix = ".onnx"

    def open_runner(self, path: Path, device: str) -> OnnxRunner:
        """An inference session on ``device``; ``cuda`` fails with ``device_unavailable``, never falls back."""
        _external_files(_load_model(path, with_data=False), path)
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CompressionError("device_unavailable", "this worker's ONNX Runtime has no CUDAExecutionProvider")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = session_options()
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT's own exception types; its message is what the user can act on
            raise CompressionError("invalid_model", _message("ONNX Runtime cannot load the model", exc)) from exc
        if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise CompressionError(
                "device_unavailable", "ONNX Runtime could not start its CUDA provider (drivers or libraries)"
            )
        return OnnxRunner(session, "cuda" if device == "cuda" else "cpu")

    def stored_size(self, path: Path) -> int:
        """The ``.onnx`` file plus each external-data file it refers to (each once; all inside its folder)."""
        files = _external_files(_load_model(path, with_data=False), path)
        return path.stat().st_size + sum(f.stat().st_size for f in files)

    def count_parameters(self, path: Path) -> tuple[int, int]:
        """(total, nonzero) elements over the model's weight tensors.

        Weights are the initializers the graph uses, of a floating-point type (float, double, float16,
        bfloat16) or int8/uint8, plus int32 tensors that a DequantizeLinear (or QLinearConv's bias slot) turns
        into floats: a quantized model's int32 biases. Quantization parameters are not weights: an initializer
        consumed only in a scale or zero-point slot of a quantization op (QuantizeLinear, DequantizeLinear,
        QLinear*, MatMulInteger, ConvInteger and their com.microsoft relatives, by the op schema's input names),
        or as the weight scale that dynamic quantization multiplies with DynamicQuantizeLinear's activation
        scale, is skipped. So a model counts the same before and after quantization (graph optimization can
        still fold tensors away, e.g. a BatchNormalization into its Conv). A quantized weight counts as zero
        where it equals its zero point.
        """
        from worker.compress.onnx_weight_only import packed_weights

        model = _load_model(path)
        packed = packed_weights(model)  # N-bit weights packed into bytes count as their logical K x N
        total = nonzero = 0
        for tensor, zero_point in _weight_tensors(model):
            if tensor.name in packed:
                total += packed[tensor.name].parameters
                nonzero += packed[tensor.name].nonzero
                continue
            values = _to_array(tensor)
            total += values.size
            nonzero += _count_nonzero(values, zero_point)
        return total, nonzero

    def example_inputs(self, path: Path, batch_size: int) -> dict[str, np.ndarray]:
        """Random inputs: symbolic dims are ``batch_size`` on axis 0 and 16 elsewhere.

        Integer inputs get small non-negative values (masks: ones, token types: zeros), so that ids stay in
        range of any embedding table; floats are standard normal; bools are True.
        """
        rng = np.random.default_rng(0)
        arrays: dict[str, np.ndarray] = {}
        for spec in _graph_inputs(_load_model(path, with_data=False)):
            shape = tuple(
                d if d is not None else (batch_size if axis == 0 else 16) for axis, d in enumerate(spec.shape)
            )
            lowered = spec.name.lower()
            if spec.dtype == np.bool_ or (spec.dtype.kind in "iu" and "mask" in lowered):
                arrays[spec.name] = np.ones(shape, dtype=spec.dtype)
            elif spec.dtype.kind in "iu":
                high = 1 if ("type" in lowered or "segment" in lowered) else 10
                arrays[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
            else:
                arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return arrays

    def prune_magnitude(self, src: Path, dst: Path, step: PruneMagnitude, ctx: StepContext | None = None) -> StepReport:
        """Zero the smallest-magnitude weights of Conv, Gemm and MatMul (constant operands of rank >= 2 only).

        Unstructured (global or per layer, with per-layer overrides) or N:M along each weight's reduction axis.
        Biases, normalization parameters and embedding tables are left alone, and so is a weight that any
        other node also reads (a tied embedding, say). The result is saved self-contained when it fits in one
        protobuf (2 GiB).
        """
        model = _load_model(src)
        params_total = sum(int(np.prod(t.dims)) for t, _ in _weight_tensors(model))
        prunable = _prunable_initializers(model)
        if not prunable:
            raise CompressionError(
                "nothing_to_prune",
                "the model has no floating-point Conv, Gemm or MatMul weights stored as initializers; "
                "prune before quantizing",
            )
        weights = {name: numpy_helper.to_array(t) for name, t in prunable.items()}
        masks = step_masks(
            {n: np.abs(w.astype(np.float32, copy=False)) for n, w in weights.items()},
            sparsity=step.target_sparsity,
            scope=step.scope,
            pattern=parse_pattern(step.pattern) if step.pattern else None,
            overrides=step.overrides,
            reduction_axes=_reduction_axes(model, set(weights)),
        )
        layers = []
        zeros_total = size_total = layers_changed = 0
        for name, w in weights.items():
            pruned = np.where(masks[name], w, np.zeros((), dtype=w.dtype)).astype(w.dtype, copy=False)
            zeros = int(w.size - np.count_nonzero(pruned))
            layers_changed += int(zeros > w.size - np.count_nonzero(w))
            zeros_total += zeros
            size_total += w.size
            layers.append({"name": name, "shape": list(w.shape), "sparsity": round(zeros / w.size, 6)})
            prunable[name].CopyFrom(numpy_helper.from_array(pruned, name))
        _save_model(model, dst)
        return StepReport(
            op="prune",
            method="magnitude",
            details={
                "scope": step.scope,
                "pattern": step.pattern,
                "overrides": dict(step.overrides),
                "requested_sparsity": step.target_sparsity,
                "achieved_sparsity": round(zeros_total / size_total, 6),
                "prunable_parameters": size_total,
                "prunable_share": round(size_total / params_total, 6) if params_total else 0.0,
                "prunable_layers": len(layers),
                "layers_pruned": layers_changed,
                "layers": layers,
            },
        )

    def layers(self, path: Path) -> list[dict[str, Any]]:
        """One row per weight tensor: name, consuming op, shape, parameters, nonzero, sparsity, bits, bytes."""
        from worker.compress.onnx_weight_only import packed_weights

        model = _load_model(path)
        consumer: dict[str, str] = {}
        for node in _all_nodes(model.graph):
            for name in node.input:
                consumer.setdefault(name, node.op_type)
        prunable = set(_prunable_initializers(model))
        packed = packed_weights(model)
        rows = []
        for tensor, zero_point in _weight_tensors(model):
            if tensor.name in packed:
                p = packed[tensor.name]
                rows.append(
                    {
                        "name": tensor.name,
                        "op": consumer.get(tensor.name),
                        "shape": p.shape,
                        "parameters": p.parameters,
                        "nonzero": p.nonzero,
                        "sparsity": round(1 - p.nonzero / p.parameters, 6) if p.parameters else 0.0,
                        "bits": p.bits,
                        "bytes": p.bytes,
                        "prunable": False,
                    }
                )
                continue
            values = _to_array(tensor)
            nonzero = _count_nonzero(values, zero_point)
            rows.append(
                {
                    "name": tensor.name,
                    "op": consumer.get(tensor.name),
                    "shape": [int(d) for d in tensor.dims],
                    "parameters": int(values.size),
                    "nonzero": nonzero,
                    "sparsity": round(1 - nonzero / values.size, 6) if values.size else 0.0,
                    "bits": int(values.dtype.itemsize * 8),
                    "bytes": int(values.nbytes),
                    "prunable": tensor.name in prunable,
                }
            )
        return rows

    def prunable_weights(self, path: Path) -> dict[str, tuple[np.ndarray, int]]:
        """The weights pruning acts on, each with its reduction axis (for N:M and per-channel arithmetic)."""
        model = _load_model(path)
        prunable = _prunable_initializers(model)
        axes = _reduction_axes(model, set(prunable))
        return {name: (numpy_helper.to_array(t), axes[name]) for name, t in prunable.items()}

    def weight_swapper(self, path: Path, device: str) -> OnnxWeightSwapper | None:
        """Sessions on ``path`` with some weights replaced in memory, for many one-layer variants of one model
        (per-layer sensitivity): no model is parsed, rewritten or saved in Python (MiniLM: ~0.17 s a variant
        against ~0.8 s through :meth:`with_weights` and a file). None on CUDA, where it has not been checked."""
        if device != "cpu":
            return None
        model = _load_model(path, with_data=False)
        _external_files(model, path)  # checked once here, as open_runner does for each session
        return OnnxWeightSwapper(path, {t.name for t in model.graph.initializer})

    def with_weights(self, src: Path, dst: Path, weights: dict[str, np.ndarray]) -> None:
        """Write ``src`` to ``dst`` with the named initializers replaced (same dtype and shape)."""
        model = _load_model(src)
        by_name = {t.name: t for t in _all_initializers(model.graph)}
        for name, values in weights.items():
            old = by_name[name]
            dtype = numpy_helper.to_array(old).dtype
            old.CopyFrom(numpy_helper.from_array(values.astype(dtype, copy=False), name))
        _save_model(model, dst)

    def prune_structured(self, src: Path, dst: Path, step: PruneStructured, ctx: StepContext) -> StepReport:
        """Remove whole output channels of Conv/Gemm/MatMul layers and resize their consumers; see onnx_structured."""
        from worker.compress.onnx_structured import prune_structured_step

        return prune_structured_step(self, src, dst, step, ctx)

    def prune_wanda(self, src: Path, dst: Path, step: PruneWanda, ctx: StepContext) -> StepReport:
        """|weight| x input-activation norm per output row of MatMul/Gemm layers; see onnx_wanda."""
        from worker.compress.onnx_wanda import wanda_step

        return wanda_step(self, src, dst, step, ctx)

    def quantize_int8_weight_only(
        self, src: Path, dst: Path, step: QuantizeInt8WeightOnly, ctx: StepContext
    ) -> StepReport:
        """Int8 MatMul/Gemm weights packed into MatMulNBits (and embeddings if asked); see onnx_weight_only."""
        from worker.compress.onnx_weight_only import weight_only_step

        return weight_only_step(self, src, dst, step, ctx)

    def quantize_int4_weight_only(
        self, src: Path, dst: Path, step: QuantizeInt4WeightOnly, ctx: StepContext
    ) -> StepReport:
        """Int4 MatMul/Gemm weights, two per byte, in groups along K (and embeddings if asked)."""
        from worker.compress.onnx_weight_only import weight_only_step

        return weight_only_step(self, src, dst, step, ctx)

    def quantize(self, src: Path, dst: Path, step: QuantizeStepT, data: EvalData | None, device: str) -> StepReport:
        """int8_dynamic / int8_static (QDQ, calibrated on ``data``) with ONNX Runtime's tools, or fp16."""
        if isinstance(step, QuantizeInt8Static) and data is None:
            raise CompressionError(
                "dataset_required", "int8_static calibrates activation ranges on a dataset; the job has none"
            )
        weight_bytes_before = _initializer_bytes(_load_model(src))  # also validates src's external data
        notes: list[str] = []
        details: dict[str, Any] = {"method": step.method}
        with _scratch(dst) as scratch:
            out = scratch / "result.onnx"
            try:
                if isinstance(step, QuantizeFp16):
                    details["per_channel"] = None
                    _convert_fp16(src, out)
                else:
                    details["per_channel"] = step.per_channel
                    prepared, details["pre_processing"] = _pre_process(src, scratch, notes)
                    if isinstance(step, QuantizeInt8Dynamic):
                        _quantize_dynamic(prepared, out, step)
                    else:
                        assert data is not None
                        details.update(_quantize_static(prepared, out, step, data, device))
            except CompressionError:
                raise
            except Exception as exc:  # onnx/ORT errors on a user's graph: report them, don't crash the job
                raise CompressionError(
                    "quantization_failed", _message(f"{step.method} quantization failed", exc)
                ) from exc
            _must_load(self, out, device, "quantization_failed", f"the {step.method} model")
            result = _load_model(out)
            details["weight_bytes_before"] = weight_bytes_before
            details["weight_bytes_after"] = _initializer_bytes(result)
            low_precision = _low_precision_weights(result, step)
            details["quantized_weights"] = low_precision
            if low_precision == 0:
                notes.append(
                    f"{step.method}: no weight is stored in lower precision; the model has no op that this "
                    "method converts"
                )
            float_conv = sum(1 for n in _all_nodes(result.graph) if n.op_type == "Conv")
            if step.method == "int8_dynamic" and float_conv:
                details["float_conv_layers"] = float_conv
                notes.append(
                    f"int8_dynamic leaves {float_conv} Conv layer(s) in float: ONNX Runtime's dynamic ConvInteger "
                    "is much slower than float Conv on CPU. Use int8_static to quantize convolutions too."
                )
            _save_model(result, dst)
        return StepReport(op="quantize", method=step.method, details=details, notes=notes)


# ----------------------------------------------------------------------------------------------------------
# Quantization


# Run in a child process whose working and temporary folders are the job's scratch folder: when symbolic shape
# inference gives up, ORT dumps the model (weights included) into the working directory and raises.
_PRE_PROCESS_TIMEOUT_S = 1800
_PRE_PROCESS_SCRIPT = """
import sys
from onnxruntime.quantization.shape_inference import quant_pre_process
src, dst = sys.argv[1], sys.argv[2]
try:
    quant_pre_process(src, dst)
    print("full")
except Exception as exc:
    print(f"symbolic shape inference failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    quant_pre_process(src, dst, skip_symbolic_shape=True)
    print("no_symbolic_shapes")
"""


def _pre_process(src: Path, scratch: Path, notes: list[str]) -> tuple[Path, str]:
    """ORT's recommended shape inference and graph clean-up before quantizing; skipped, with a note, if it fails.

    Symbolic shape inference (best for transformers) gives up on some exports, e.g. torch.export's
    ``min(512, sequence)`` bounds; ONNX's own shape inference and the graph clean-up still help then.
    Returns the model to quantize and how it was prepared: "full", "no_symbolic_shapes" or "skipped".
    """
    dst = scratch / "pre_processed.onnx"
    work = scratch / "pre_process"
    work.mkdir()
    env = {**os.environ, "TMPDIR": str(work)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PRE_PROCESS_SCRIPT, str(src.resolve()), str(dst.resolve())],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=_PRE_PROCESS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        notes.append(f"quantization pre-processing was skipped: it took over {_PRE_PROCESS_TIMEOUT_S} s")
        return src, "skipped"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines and lines[-1] in ("full", "no_symbolic_shapes") and dst.is_file():
        return dst, lines[-1]
    error = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    notes.append(f"quantization pre-processing was skipped: {error[0]}"[:300])
    return src, "skipped"


def _quantize_dynamic(src: Path, dst: Path, step: QuantizeInt8Dynamic) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    # Conv stays float: ONNX Runtime's ConvInteger ran 15-40x slower than float Conv on CPU here (digits CNN,
    # batch 64), so dynamic int8 would make CNNs smaller but much slower. int8_static quantizes Conv well.
    op_types = [op for op in IntegerOpsRegistry if op != "Conv"]
    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=op_types,
        per_channel=step.per_channel,
        weight_type=QuantType.QInt8,
        use_external_data_format=_too_big_for_protobuf(src),
    )


def _quantize_static(src: Path, dst: Path, step: QuantizeInt8Static, data: EvalData, device: str) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    inputs = _graph_inputs(_load_model(src, with_data=False))
    missing = [i.name for i in inputs if i.name not in data.inputs]
    if missing:
        raise CompressionError(
            "input_mismatch",
            f"the dataset has no array for model input(s) {missing}; the model expects {[i.name for i in inputs]}",
        )
    samples = data.head(step.calibration_samples)
    fixed = inputs[0].shape[0] if inputs and inputs[0].shape else None
    batch_size = fixed or 32
    batches: list[dict[str, np.ndarray]] = []
    for start in range(0, samples.num_samples, batch_size):
        batch = {i.name: samples.inputs[i.name][start : start + batch_size].astype(i.dtype) for i in inputs}
        real = len(next(iter(batch.values())))
        if fixed and real < fixed:  # a fixed batch dimension is filled with copies of a real sample
            batch = {k: np.concatenate([v, np.repeat(v[:1], fixed - real, axis=0)]) for k, v in batch.items()}
        batches.append(batch)

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    # u8 activations / s8 weights is ORT's advice for x86 CPUs; GPUs (TensorRT) want symmetric s8 for both.
    on_gpu = device == "cuda"
    activation = QuantType.QInt8 if on_gpu else QuantType.QUInt8
    quantize_static(
        str(src),
        str(dst),
        _Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=step.per_channel,
        activation_type=activation,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        calibration_providers=["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else None,
        use_external_data_format=_too_big_for_protobuf(src),
        extra_options={"ActivationSymmetric": on_gpu},
    )
    return {
        "format": "QDQ",
        "calibration_samples": samples.num_samples,
        "calibration_batches": len(batches),
        "activation_type": "int8" if on_gpu else "uint8",
        "weight_type": "int8",
    }


def _convert_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(_load_model(src), keep_io_types=True)
    _save_model(model, dst)


def _low_precision_weights(model: onnx.ModelProto, step: QuantizeStepT) -> int:
    wanted = {TensorProto.FLOAT16} if isinstance(step, QuantizeFp16) else _INT8_TYPES
    return sum(1 for t, _ in _weight_tensors(model) if t.data_type in wanted)


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(_to_array(t).nbytes for t in _all_initializers(model.graph))


# ----------------------------------------------------------------------------------------------------------
# Weights


def _weight_tensors(model: onnx.ModelProto) -> list[tuple[TensorProto, np.ndarray | None]]:
    """The tensors ``count_parameters`` counts, each with its zero point broadcast to its shape (or None)."""
    initializers = {t.name: t for t in _all_initializers(model.graph)}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    nodes = list(_all_nodes(model.graph))
    for node in nodes:
        for slot, name in enumerate(node.input):
            if name in initializers:
                consumers.setdefault(name, []).append((node, slot))
    dynamic_scales = {
        node.output[1] for node in nodes if node.op_type == "DynamicQuantizeLinear" and len(node.output) > 1
    }

    def is_weight_use(node: onnx.NodeProto, slot: int) -> bool:
        if node.op_type == "Mul" and any(i in dynamic_scales for i in node.input):
            return False  # ORT dynamic quantization: weight scale x activation scale
        return not _is_quant_param_slot(node, slot)

    weights: list[tuple[TensorProto, np.ndarray | None]] = []
    for name, tensor in initializers.items():
        uses = [(n, s) for n, s in consumers.get(name, []) if is_weight_use(n, s)]
        if not uses:
            continue
        if tensor.data_type == TensorProto.INT32:
            if not any(
                (n.op_type == "DequantizeLinear" and s == 0) or (n.op_type == "QLinearConv" and s == 8) for n, s in uses
            ):
                continue
        elif tensor.data_type not in _FLOAT_TYPES | _INT8_TYPES:
            continue
        zero_point = None
        if tensor.data_type in _INT8_TYPES:
            zero_point = _zero_point_for(tensor, uses, initializers)
        weights.append((tensor, zero_point))
    return weights


def _zero_point_for(
    tensor: TensorProto, uses: list[tuple[onnx.NodeProto, int]], initializers: dict[str, TensorProto]
) -> np.ndarray | None:
    for node, slot in uses:
        where = _WEIGHT_ZERO_POINTS.get((node.op_type, slot))
        if where is None:
            continue
        zp_slot, axis_rule = where
        if len(node.input) <= zp_slot or node.input[zp_slot] not in initializers:
            return None  # no zero point: it is 0
        zp = numpy_helper.to_array(initializers[node.input[zp_slot]])
        if zp.size == 1:
            return zp.reshape(())
        ndim = len(tensor.dims)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if axis_rule == "attr":
            axis = int(attrs.get("axis", 1))
        elif axis_rule == "transB":
            axis = 0 if attrs.get("transB", 0) else 1
        else:
            axis = int(axis_rule)
        axis %= max(ndim, 1)
        if ndim == 0 or zp.ndim != 1 or zp.size != tensor.dims[axis]:
            return None  # blocked or unusual layouts: treat stored zeros as zeros
        shape = [1] * ndim
        shape[axis] = zp.size
        return zp.reshape(shape)
    return None


def _count_nonzero(values: np.ndarray, zero_point: np.ndarray | None) -> int:
    if zero_point is None:
        return int(np.count_nonzero(values))
    return int(np.count_nonzero(values != zero_point))


def _is_quant_param_slot(node: onnx.NodeProto, slot: int) -> bool:
    op = node.op_type
    if not (
        op in ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger")
        or re.match(r"Q[A-Z]", op)
        or any(part in op for part in ("Quantize", "Integer", "NBits", "Bnb4"))
    ):
        return False
    if op == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per input
        return slot < 2 or (slot - 2) % 3 != 0
    names = _schema_inputs(op, node.domain or "")
    if not names:
        return False
    formal = names[min(slot, len(names) - 1)].lower()
    return "scale" in formal or "zero_point" in formal


@cache
def _schema_inputs(op: str, domain: str) -> tuple[str, ...]:
    """Formal input names of the newest schema ONNX Runtime knows for ``op`` (standard and contrib ops)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    domain = "" if domain == "ai.onnx" else domain
    best = None
    for schema in C.get_all_operator_schema():
        if schema.name == op and schema.domain == domain and (best is None or schema.since_version > best[0]):
            best = (schema.since_version, tuple(i.name for i in schema.inputs))
    return best[1] if best else ()


def _prunable_initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Float initializers of rank >= 2 that are read only as the constant operand of Conv, Gemm or MatMul."""
    initializers = {t.name: t for t in model.graph.initializer}
    uses: dict[str, list[bool]] = {}
    for node in _all_nodes(model.graph):
        for slot, name in enumerate(node.input):
            if name in initializers:
                ok = node.domain in ("", "ai.onnx") and slot in _PRUNABLE_SLOTS.get(node.op_type, ())
                uses.setdefault(name, []).append(ok)
    graph_outputs = {o.name for o in model.graph.output}
    return {
        name: t
        for name, t in initializers.items()
        if uses.get(name)
        and all(uses[name])
        and name not in graph_outputs
        and t.data_type in _FLOAT_TYPES
        and len(t.dims) >= 2
    }


def _reduction_axes(model: onnx.ModelProto, names: set[str]) -> dict[str, int]:
    """For each weight, the axis its consumer sums over (Conv: input channels; MatMul/Gemm: K)."""
    axes: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for slot, name in enumerate(node.input):
            if name not in names or name in axes:
                continue
            if node.op_type == "Conv":
                axes[name] = 1
            elif node.op_type == "MatMul":
                axes[name] = -2 if slot == 1 else -1
            elif node.op_type == "Gemm":
                trans = attrs.get("transB", 0) if slot == 1 else attrs.get("transA", 0)
                axes[name] = (1 if trans else 0) if slot == 1 else (0 if trans else 1)
    for name in names:
        axes.setdefault(name, -1)
    return axes


# ----------------------------------------------------------------------------------------------------------
# Files and graphs


def _load_model(path: Path, with_data: bool = True) -> onnx.ModelProto:
    """The model at ``path``; its external data (checked to stay in the folder) loaded if ``with_data``."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CompressionError("invalid_model", _message("not a readable ONNX model", exc)) from exc
    if with_data and _external_files(model, path):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise CompressionError("invalid_model", _message("cannot read the external weights", exc)) from exc
    return model


def _external_files(model: onnx.ModelProto, path: Path) -> set[Path]:
    """The distinct external-data files ``model`` (stored at ``path``) uses; each must be in its folder."""
    folder = path.parent.resolve()
    files: set[Path] = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise CompressionError(
                "invalid_model",
                f"tensor {tensor.name!r} refers to external data {location!r} outside the model's folder",
            )
        if not target.is_file():
            raise CompressionError(
                "invalid_model", f"tensor {tensor.name!r} refers to missing external data file {location!r}"
            )
        files.add(target)
    return files


def _save_model(model: onnx.ModelProto, dst: Path) -> None:
    """Write ``model`` to ``dst`` atomically, self-contained unless it exceeds protobuf's 2 GiB limit."""
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp"
    _strip_node_debug_info(model)
    try:
        if model.ByteSize() < _PROTOBUF_LIMIT:
            onnx.save_model(model, str(tmp))
        else:
            onnx.save_model(
                model,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{dst.name}.data",
            )
        os.replace(tmp, dst)
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError("save_failed", _message("could not write the ONNX model", exc)) from exc
    finally:
        tmp.unlink(missing_ok=True)


# Per-node debug records of torch's exporters: the Python stack trace of each op (with the exporting machine's
# file paths) and the FX node's text. Nothing reads them at run time; name scopes and class hierarchy are kept.
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _strip_node_debug_info(model: onnx.ModelProto) -> None:
    """Drop exporters' per-node debug records (``doc_string`` stack traces, ``_DEBUG_METADATA``): 245 KB of
    MiniLM's 90 MB, and a downloaded artifact should not carry the exporting machine's paths."""
    for node in _all_nodes(model.graph):
        if node.doc_string:
            node.doc_string = ""
        if any(p.key in _DEBUG_METADATA for p in node.metadata_props):
            kept = [p for p in node.metadata_props if p.key not in _DEBUG_METADATA]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _must_load(backend: OnnxBackend, path: Path, device: str, code: str, what: str) -> None:
    """Raise ``code`` unless ONNX Runtime loads the model a step wrote (a missing device stays its own error)."""
    try:
        backend.open_runner(path, device)
    except CompressionError as exc:
        if exc.code == "device_unavailable":
            raise
        raise CompressionError(code, f"{what} does not load: {exc.message}") from exc


def _too_big_for_protobuf(path: Path) -> bool:
    return OnnxBackend().stored_size(path) >= _PROTOBUF_LIMIT


@contextlib.contextmanager
def _scratch(dst: Path) -> Iterator[Path]:
    """A private folder beside ``dst`` for intermediate files, removed with everything in it afterwards."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    folder = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _graph_inputs(model: onnx.ModelProto) -> list[_InputSpec]:
    """Inputs a caller must feed (initializers listed as inputs by old exporters are not)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise CompressionError("unsupported_input_type", f"model input {value.name!r} is not a tensor")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except Exception as exc:
            raise CompressionError(
                "unsupported_input_type", f"model input {value.name!r} has an element type numpy lacks"
            ) from exc
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        specs.append(_InputSpec(value.name, dtype, shape))
    return specs


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _all_subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_subgraphs(g)


def _all_initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    for g in _all_subgraphs(graph):
        yield from g.initializer


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor that can hold external data: initializers, sparse ones, and tensor attributes."""
    for g in _all_subgraphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def _to_array(tensor: TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:
        raise CompressionError("invalid_model", _message(f"cannot read tensor {tensor.name!r}", exc)) from exc


def _message(prefix: str, exc: BaseException, limit: int = _MAX_MESSAGE) -> str:
    return f"{prefix}: {type(exc).__name__}: {exc}"[:limit]
