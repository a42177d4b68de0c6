"""TorchScript archives (``torch.jit.save``): load, run, count, prune, cast to fp16/bf16 and convert to ONNX.

Imported only through ``backend.get_backend("torchscript")``: it imports torch at import time, which the Celery
worker's parent process must never do (forked children spin forever, see FINDINGS). The archive's code is compiled
and run by the TorchScript interpreter here, inside the sandboxed pipeline process only; the API inspected it
without running it (``app.inspection.torchscript``).

Input names are those of ``forward``'s schema (``input`` for an ``nn.Sequential``); arguments with defaults are
left to their defaults. TorchScript records no input shapes: random example inputs (latency without a dataset, the
checks after each step) come from a traced archive's recorded example inputs, so a scripted archive needs the job's
dataset. Floating-point inputs are fed as float32 (or as the module's own float dtype, for an uploaded half or
bfloat16 module).

Weights: parameters and buffers of the module tree. A weight is prunable when the forward graph (inlined) feeds it
to a convolution, ``linear`` or a matrix product, possibly through views; embedding tables are not.

fp16/bf16 cast the parameters and buffers and wrap the module in a boundary module (``_PrecisionBoundary``) whose
forward casts floating inputs to the new dtype and floating outputs back to float32, so the signature a user calls
is unchanged. Layer names stay those of the original module: the boundary is looked through everywhere.
"""

from __future__ import annotations

import contextlib
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.inspection.torchscript import output_names, read_traced_inputs
from app.jobs.spec import ConvertOnnx, PruneMagnitude, QuantizeBf16, QuantizeFp16, parse_pattern
from worker.compress.backend import QuantizeStepT
from worker.compress.convert import onnx_conversion_report
from worker.compress.pruning import magnitude_report, step_masks
from worker.compress.types import CompressionError, EvalData, StepContext, StepReport, torch_errors
from worker.compress.weight_swap import ModuleWeightSwapper

_CONV_KINDS = {
    f"aten::{name}"
    for name in (
        "conv1d",
        "conv2d",
        "conv3d",
        "_convolution",
        "convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
    )
}
# op kind -> {input slot holding a weight matrix: the axis that slot's consumer sums over}
_WEIGHT_SLOTS: dict[str, dict[int, int]] = {
    **{kind: {1: 1} for kind in _CONV_KINDS},
    "aten::linear": {1: 1},
    "aten::matmul": {0: -1, 1: -2},
    "aten::mm": {0: -1, 1: -2},
    "aten::bmm": {0: -1, 1: -2},
    "aten::addmm": {1: -1, 2: -2},
    "aten::baddbmm": {1: -1, 2: -2},
}
_VIEW_KINDS = {
    f"aten::{name}"
    for name in (
        "t", "transpose", "permute", "view", "reshape", "contiguous", "to", "detach", "clone", "unsqueeze",
        "squeeze", "expand", "numpy_T", "mT",
    )
}  # fmt: skip
_EMBEDDING_KINDS = {"aten::embedding", "aten::embedding_bag"}
_BOUNDARY = "_PrecisionBoundary"
_CHECK_SAMPLES = 8


class _PrecisionBoundary(nn.Module):
    """Holds the cast module; its forward is defined from the wrapped module's schema (see ``_wrap``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


# ----------------------------------------------------------------------------------------------------
# Loading and the forward signature


def _load(path: Path, device: str = "cpu") -> torch.jit.ScriptModule:
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise CompressionError(
            "invalid_model", f"{path.name} is not a loadable TorchScript archive: {exc}"[:2000]
        ) from exc
    module.eval()
    return module


def _model_root(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """The user's module: inside a precision boundary written by an earlier fp16/bf16 step, else itself."""
    return module.inner if module.original_name == _BOUNDARY else module


def _tensor_arguments(module: torch.jit.ScriptModule) -> list[str]:
    """Names of ``forward``'s required arguments (all tensors: anything else is refused)."""
    names = []
    for arg in module.forward.schema.arguments[1:]:
        if arg.has_default_value():
            continue
        if str(arg.type) != "Tensor":
            raise CompressionError(
                "unsupported_model",
                f"forward takes '{arg.name}: {arg.type}'; only tensor inputs are supported",
            )
        names.append(arg.name)
    if not names:
        raise CompressionError("unsupported_model", "forward takes no tensor inputs")
    return names


def _return_type(module: torch.jit.ScriptModule) -> str:
    returns = module.forward.schema.returns
    return str(returns[0].type) if len(returns) == 1 else "(" + ", ".join(str(r.type) for r in returns) + ")"


def _input_float_dtype(module: torch.jit.ScriptModule) -> torch.dtype:
    """float32, or an uploaded half/bfloat16 module's own float dtype (a boundary takes float32 itself)."""
    if module.original_name == _BOUNDARY:
        return torch.float32
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _numpy(t: Any) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    t = t.detach().cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, list | tuple):
        return [leaf for item in out for leaf in _flatten(item)]
    if isinstance(out, dict):
        return [leaf for item in out.values() for leaf in _flatten(item)]
    return [out]


class TorchScriptRunner:
    """Runs ``forward`` under ``torch.inference_mode`` with the inputs bound by name."""

    fixed_batch = None  # TorchScript records no static batch size

    def __init__(self, module: torch.jit.ScriptModule, device: str) -> None:
        self.device = device
        self.runtime = f"torch {torch.__version__.split('+')[0]} {device} (TorchScript)"
        self.input_names = _tensor_arguments(module)
        self._float = _input_float_dtype(module)
        self.module = module

    def tensors(self, inputs: dict[str, np.ndarray]) -> list[torch.Tensor]:
        tensors = []
        for name in self.input_names:
            arr = _array(inputs, name, self.input_names)
            if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays (np.load gives those)
                arr = arr.copy()
            t = torch.from_numpy(np.ascontiguousarray(arr))
            tensors.append(t.to(device=self.device, dtype=self._float if t.is_floating_point() else t.dtype))
        return tensors

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = self.tensors(inputs)
        # TorchScript's print() writes to sys.stdout, the sandbox's result channel: send it to stderr.
        with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
            out = self.module(*args)
        return [_numpy(t) for t in _flatten(out)]

    def time_calls(self, inputs: dict[str, np.ndarray], warmup: int, runs: int) -> list[float]:
        """Milliseconds per call with the inputs already on the device, timed with CUDA events on a GPU."""
        from worker.compress.evaluate import device_call_times

        args = self.tensors(inputs)
        with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
            return device_call_times(lambda: self.module(*args), self.device, warmup, runs)


def _array(inputs: dict[str, np.ndarray], name: str, names: list[str]) -> np.ndarray:
    if name in inputs:
        return inputs[name]
    if len(names) == 1:
        for alias in ("input", "inputs"):
            if alias in inputs:
                return inputs[alias]
    raise CompressionError(
        "input_mismatch",
        f"no array named {name!r} in the data; the model's inputs are {names}"
        + (" (a single-input model also accepts 'input' or 'inputs')" if len(names) == 1 else ""),
        {"expected_inputs": names, "given": sorted(inputs)},
    )


def _example_inputs(path: Path, names: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """Random inputs shaped like a traced archive's recorded example inputs, batch dimension set to ``batch_size``."""
    with zipfile.ZipFile(path) as zf:
        traced = read_traced_inputs(zf)
    if traced is None or len(traced) != len(names):
        raise CompressionError(
            "dataset_required",
            "this TorchScript archive records no input shapes (it was scripted, not traced): give the job a "
            "dataset so the model can be run",
        )
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (shape, dtype) in zip(names, traced, strict=True):
        dims = (batch_size, *shape[1:]) if shape else ()
        if dtype in ("float32", "float64", "float16", "bfloat16"):
            arrays[name] = rng.standard_normal(dims).astype(np.float32)
        elif dtype == "bool":
            arrays[name] = np.zeros(dims, dtype=bool)
        else:  # integer inputs are usually indices: 0 is always a valid one
            arrays[name] = np.zeros(dims, dtype=np.dtype(dtype))
    return arrays


def _check_inputs(path: Path, names: list[str], data: EvalData | None) -> dict[str, np.ndarray] | None:
    """A few samples to run a written model on: the dataset's, else random traced-shape ones, else None."""
    if data is not None:
        head = data.head(_CHECK_SAMPLES)
        return {name: _array(head.inputs, name, names) for name in names}
    try:
        return _example_inputs(path, names, 2)
    except CompressionError:
        return None


def _save(module: torch.jit.ScriptModule, dst: Path) -> None:
    try:
        torch.jit.save(module, str(dst))
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def _check_runs(path: Path, data: EvalData | None) -> list[str]:
    """Load a written archive and run it once, so a broken artifact fails the step that wrote it."""
    runner = TorchScriptRunner(_load(path), "cpu")
    inputs = _check_inputs(path, runner.input_names, data)
    if inputs is None:
        return ["The written model was loaded but not run: without a dataset there are no inputs to run it on."]
    with torch_errors("invalid_output", "running the written model"):
        runner(inputs)
    return []


# ----------------------------------------------------------------------------------------------------
# Weights


def _graph_weights(root: torch.jit.ScriptModule) -> tuple[dict[str, str], dict[str, int]]:
    """(consuming op of each parameter/buffer read in forward, reduction axis of each prunable weight).

    Follows ``prim::GetAttr`` chains from ``self`` in the inlined forward graph (nested blocks included); a weight
    is prunable when a convolution, ``linear`` or matrix product takes it, directly or through views, as its weight
    operand, and no embedding reads it.
    """
    graph = root.inlined_graph
    paths: dict[int, tuple[str, bool]] = {next(graph.inputs()).unique(): ("", False)}
    ops: dict[str, str] = {}
    axes: dict[str, int] = {}
    embedded: set[str] = set()
    blocks = [graph]
    while blocks:
        block = blocks.pop()
        for node in block.nodes():
            kind, inputs = node.kind(), list(node.inputs())
            source = paths.get(inputs[0].unique()) if inputs else None
            if kind == "prim::GetAttr" and source is not None:
                parent, _ = source
                paths[node.output().unique()] = (f"{parent}.{node.s('name')}" if parent else node.s("name"), False)
            elif kind in _VIEW_KINDS and source is not None and source[0]:
                paths[node.output().unique()] = (source[0], True)
            else:
                for slot, value in enumerate(inputs):
                    found = paths.get(value.unique())
                    if found is None or not found[0]:
                        continue
                    name, through_view = found
                    ops.setdefault(name, kind.split("::")[-1])
                    if kind in _EMBEDDING_KINDS:
                        embedded.add(name)
                    elif slot in _WEIGHT_SLOTS.get(kind, {}):
                        axes.setdefault(name, -1 if through_view else _WEIGHT_SLOTS[kind][slot])
            blocks.extend(node.blocks())
    return ops, {name: axis for name, axis in axes.items() if name not in embedded}


def _weights(root: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Floating-point parameters and buffers by qualified name, each storage once."""
    seen: set[int] = set()
    weights = {}
    for name, t in [*root.named_parameters(), *root.named_buffers()]:
        if t.is_floating_point() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            weights[name] = t
    return weights


def _prunable(root: torch.jit.ScriptModule) -> dict[str, tuple[torch.Tensor, int]]:
    weights = _weights(root)
    _, axes = _graph_weights(root)
    return {name: (weights[name], axis) for name, axis in axes.items() if name in weights and weights[name].dim() >= 2}


# ----------------------------------------------------------------------------------------------------
# Precision


def _wrap(root: torch.jit.ScriptModule, dtype: torch.dtype) -> torch.jit.ScriptModule:
    """A boundary module around ``root`` (already cast) with the same forward arguments: floating inputs to
    ``dtype``, floating outputs back to float32."""
    names = _tensor_arguments(root)
    outputs = output_names(_return_type(root))
    if outputs is None:
        raise CompressionError(
            "unsupported_model",
            f"forward returns {_return_type(root)}; casting a TorchScript model needs a forward that returns a "
            "tensor or a tuple of tensors",
        )
    target = {torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}[dtype]
    results = [f"_squeeze_out{i}" for i in range(len(outputs))]
    back = [f"({r}.to(torch.float32) if {r}.is_floating_point() else {r})" for r in results]
    lines = [
        f"def forward(self, {', '.join(f'{n}: Tensor' for n in names)}):",
        *(f"    {n} = {n}.to({target}) if {n}.is_floating_point() else {n}" for n in names),
        f"    {', '.join(results)} = self.inner({', '.join(names)})",
        f"    return {back[0] if len(back) == 1 else '(' + ', '.join(back) + ')'}",
    ]
    boundary = torch.jit._recursive.create_script_module(_PrecisionBoundary(root), lambda m: [])
    boundary.define("\n".join(lines) + "\n")
    return boundary


# ----------------------------------------------------------------------------------------------------
# The backend


class TorchScriptBackend:
    """FormatBackend for TorchScript archives."""

    name = "torchscript"
    suffix = ".pt"

    def open_runner(self, path: Path, device: str) -> TorchScriptRunner:
        if device == "cuda" and not torch.cuda.is_available():
            raise CompressionError("device_unavailable", "CUDA was requested but this worker has no usable GPU")
        if device not in ("cpu", "cuda"):
            raise CompressionError("device_unavailable", f"unknown device {device!r}")
        return TorchScriptRunner(_load(path, device), device)

    def stored_size(self, path: Path) -> int:
        return path.stat().st_size

    def count_parameters(self, path: Path) -> tuple[int, int]:
        weights = _weights(_model_root(_load(path)))
        total = sum(t.numel() for t in weights.values())
        return total, sum(int(torch.count_nonzero(t.detach())) for t in weights.values())

    def example_inputs(self, path: Path, batch_size: int) -> dict[str, np.ndarray]:
        return _example_inputs(path, _tensor_arguments(_load(path)), batch_size)

    def layers(self, path: Path) -> list[dict[str, Any]]:
        """One row per weight tensor: name, consuming op, shape, parameters, nonzero, sparsity, bits, bytes."""
        root = _model_root(_load(path))
        ops, axes = _graph_weights(root)
        rows = []
        for name, t in _weights(root).items():
            numel, nonzero = t.numel(), int(torch.count_nonzero(t.detach()))
            rows.append(
                {
                    "name": name,
                    "op": ops.get(name),
                    "shape": list(t.shape),
                    "parameters": numel,
                    "nonzero": nonzero,
                    "sparsity": round(1 - nonzero / numel, 6) if numel else 0.0,
                    "bits": t.element_size() * 8,
                    "bytes": numel * t.element_size(),
                    "prunable": name in axes and t.dim() >= 2,
                }
            )
        return rows

    def prunable_weights(self, path: Path) -> dict[str, tuple[np.ndarray, int]]:
        """The weights pruning acts on, each with its reduction axis (for N:M and per-channel arithmetic)."""
        return {
            name: (t.detach().float().cpu().numpy(), axis)
            for name, (t, axis) in _prunable(_model_root(_load(path))).items()
        }

    def weight_swapper(self, path: Path, device: str) -> ModuleWeightSwapper[TorchScriptRunner]:
        """One runner whose prunable weights are swapped in place (see ``weight_swap``), for per-layer sensitivity."""
        runner = self.open_runner(path, device)
        return ModuleWeightSwapper(runner, {name: t for name, (t, _) in _prunable(_model_root(runner.module)).items()})

    def with_weights(self, src: Path, dst: Path, weights: dict[str, np.ndarray]) -> None:
        """Write ``src`` to ``dst`` with the named weights replaced (same dtype and shape)."""
        module = _load(src)
        current = _weights(_model_root(module))
        with torch.no_grad():
            for name, values in weights.items():
                t = current[name]
                t.copy_(torch.from_numpy(np.ascontiguousarray(values)).to(dtype=t.dtype, device=t.device))
        _save(module, dst)

    def prune_magnitude(self, src: Path, dst: Path, step: PruneMagnitude, ctx: StepContext | None = None) -> StepReport:
        module = _load(src)
        prunable = _prunable(_model_root(module))
        if not prunable:
            raise CompressionError(
                "nothing_to_prune", "the module has no floating-point Conv/Linear/MatMul weights to prune"
            )
        masks = step_masks(
            {k: np.abs(t.detach().float().cpu().numpy()) for k, (t, _) in prunable.items()},
            sparsity=step.target_sparsity,
            scope=step.scope,
            pattern=parse_pattern(step.pattern) if step.pattern else None,
            overrides=step.overrides,
            reduction_axes={k: axis for k, (_, axis) in prunable.items()},
        )
        layers = []
        zeros = total = 0
        with torch_errors("pruning_failed", "writing the pruned weights"), torch.no_grad():
            for key, (t, _) in prunable.items():
                t.mul_(torch.from_numpy(masks[key]).to(device=t.device, dtype=t.dtype))
                z = t.numel() - int(torch.count_nonzero(t))
                zeros, total = zeros + z, total + t.numel()
                layers.append({"name": key, "shape": list(t.shape), "sparsity": round(z / t.numel(), 6)})
            _save(module, dst)
        notes = _check_runs(dst, ctx.data if ctx else None)
        return magnitude_report(step, layers, zeros, total, notes)

    def quantize_fp16(self, src: Path, dst: Path, step: QuantizeFp16, ctx: StepContext | None = None) -> StepReport:
        return self._cast(src, dst, torch.float16, ctx)

    def quantize_bf16(self, src: Path, dst: Path, step: QuantizeBf16, ctx: StepContext | None = None) -> StepReport:
        return self._cast(src, dst, torch.bfloat16, ctx)

    def quantize(self, src: Path, dst: Path, step: QuantizeStepT, data: EvalData | None, device: str) -> StepReport:
        if isinstance(step, QuantizeFp16):
            return self._cast(src, dst, torch.float16, None)
        raise CompressionError(
            "method_not_supported",
            f"quantize/{step.method} is not available for TorchScript models; convert to ONNX first "
            '({"op": "convert", "method": "onnx"}) and quantize there',
        )

    def _cast(self, src: Path, dst: Path, dtype: torch.dtype, ctx: StepContext | None) -> StepReport:
        method = "fp16" if dtype == torch.float16 else "bf16"
        before = self.stored_size(src)
        with torch_errors("quantization_failed", f"{method} conversion"):
            root = _model_root(_load(src))
            root.to(dtype)  # floating parameters and buffers only
            cast = sum(1 for t in _weights(root).values() if t.dtype == dtype)
            _save(_wrap(root, dtype), dst)
        notes = _check_runs(dst, ctx.data if ctx else None)
        after = self.stored_size(dst)
        notes.append(
            f"Weights and compute in {str(dtype).removeprefix('torch.')}; inputs and outputs keep float32 (the "
            "archive's forward casts them). Tensors the code creates itself keep their dtype; CPU half-precision "
            "kernels can be slow."
        )
        return StepReport(
            op="quantize",
            method=method,
            details={
                "method": method,
                "cast_tensors": cast,
                "bytes_before": before,
                "bytes_after": after,
                "size_ratio": round(after / before, 4),
            },
            notes=notes,
        )

    def convert_onnx(self, src: Path, dst: Path, step: ConvertOnnx, ctx: StepContext) -> StepReport:
        """torch.onnx's TorchScript exporter (``dynamo=False``: the dynamo exporter takes no ScriptModule); input
        shapes from the dataset's first samples or the traced example inputs; every batch dimension dynamic."""
        module = _load(src)
        runner = TorchScriptRunner(module, "cpu")
        names = runner.input_names
        outputs = output_names(_return_type(module))
        if outputs is None:
            raise CompressionError(
                "unsupported_model",
                f"forward returns {_return_type(module)}; ONNX export needs a tensor or a tuple of tensors",
            )
        inputs = _check_inputs(src, names, ctx.data)
        if inputs is None:
            raise CompressionError(
                "dataset_required",
                "converting a scripted TorchScript module needs example inputs: give the job a dataset",
            )
        expected = runner(inputs)
        dynamic = {name: {0: "batch"} for name in [*names, *outputs]}
        # The exporter (and the module's own print calls while it is traced) write to stdout: see the runner.
        with (
            torch_errors("conversion_failed", "ONNX export (torch.onnx, TorchScript)"),
            contextlib.redirect_stdout(sys.stderr),
        ):
            torch.onnx.export(
                module,
                tuple(runner.tensors(inputs)),
                str(dst),
                input_names=names,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=step.opset,
                dynamo=False,
                verbose=False,
            )
        return onnx_conversion_report(
            dst,
            inputs,
            expected,
            exporter=f"torch.onnx {torch.__version__.split('+')[0]} (TorchScript exporter, dynamo=False)",
            opset=step.opset,
        )
