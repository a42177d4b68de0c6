"""torch.export programs (``.pt2``): load, run, count, prune and quantize them.

Imported only through ``backend.get_backend("pt2")``: it imports torch and torchao at import time, and the
Celery worker's parent process must never do that (forked children spin forever, see FINDINGS).

Input names: those of the program's signature (``ep.graph_signature.user_inputs``), i.e. the forward's
argument names: ``x`` for ``forward(self, x)``, ``input`` for an ``nn.Sequential``. A dataset holds one array
per input under that name; a single-input model also accepts the array under ``input`` or ``inputs``. Nested
inputs (lists, dicts) use the flattened placeholder names from the signature.

Parameter counting rule (``count_parameters``): a weight is a parameter, buffer or lifted tensor constant
that the graph reads and that is either a floating-point tensor (weights, biases, norm scales, running
statistics) or an int8/uint8 tensor that is dequantized (a PT2E-quantized weight). Quantization scales and
zero points, integer buffers such as ``num_batches_tracked`` and tensors the graph never reads are not
counted, so quantizing a model leaves its count unchanged; only conv-batchnorm folding (PT2E folds BN into
the conv) changes it, and pruning changes the non-zero count. A weight stored as integer codes that the graph
decodes with plain ops (int8/int4 weight-only, see ``pt2_weight_only``) counts as its decoded tensor, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sympy
import torch
import torchao  # noqa: F401  (registers quantized_decomposed ops: PT2E-quantized programs load only after this)
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from app.jobs.spec import (
    ConvertOnnx,
    Finetune,
    PruneGradient,
    PruneMagnitude,
    PruneRegularized,
    QuantizeBf16,
    QuantizeFp16,
    QuantizeInt4WeightOnly,
    QuantizeInt8Dynamic,
    QuantizeInt8Static,
    QuantizeInt8WeightOnly,
    parse_pattern,
)
from worker.compress.backend import QuantizeStepT
from worker.compress.pruning import magnitude_report, step_masks
from worker.compress.types import CompressionError, EvalData, StepContext, StepReport, torch_errors
from worker.compress.weight_swap import ModuleWeightSwapper, tensor_at

_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_CONV_OPS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
}
# op name -> argument positions that hold a weight matrix
_WEIGHT_ARGS = {
    **dict.fromkeys(_CONV_OPS, (1,)),
    "linear": (1,),
    "matmul": (0, 1),
    "mm": (0, 1),
    "bmm": (0, 1),
}
_WEIGHT_ARGS |= {"addmm": (1, 2), "baddbmm": (1, 2)}
_VIEW_OPS = {
    "t", "transpose", "permute", "view", "reshape", "_unsafe_view", "expand", "unsqueeze", "squeeze",
    "contiguous", "clone", "alias", "detach", "_to_copy", "to", "numpy_T", "mT",
}  # fmt: skip
_CALIBRATION_BATCH = 32


# ----------------------------------------------------------------------------------------------------
# Program inspection


@dataclass(frozen=True)
class _TensorInput:
    name: str
    dtype: torch.dtype
    dims: tuple[int | sympy.Expr, ...]  # int for static dimensions, a sympy expression for dynamic ones


def _op_name(node: torch.fx.Node) -> str | None:
    """``conv2d`` for ``aten.conv2d.default``; None for anything that is not an aten op call."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    ns, _, name = node.target._schema.name.partition("::")
    return name if ns == "aten" else None


def _is_quant_op(node: torch.fx.Node, prefix: str = "") -> bool:
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.OpOverload)
        and target.namespace == "quantized_decomposed"
        and target._schema.name.split("::")[1].startswith(prefix)
    )


def _load(path: Path) -> ExportedProgram:
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise CompressionError(
            "invalid_model", f"{path.name} is not a loadable torch.export program (.pt2): {exc}"[:2000]
        ) from exc


def _placeholders(ep: ExportedProgram) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}


def _tensor_inputs(ep: ExportedProgram) -> list[_TensorInput]:
    nodes = _placeholders(ep)
    specs = []
    for name in ep.graph_signature.user_inputs:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor):
            raise CompressionError(
                "unsupported_model",
                f"input {name!r} of the program is not a tensor; only tensor inputs are supported",
            )
        dims = tuple(int(d) if isinstance(d, int) else d.node.expr for d in val.shape)
        specs.append(_TensorInput(name, val.dtype, dims))
    if not specs:
        raise CompressionError("unsupported_model", "the program takes no tensor inputs")
    return specs


def _symbol_range(ep: ExportedProgram, sym: sympy.Symbol) -> tuple[int, int | None]:
    vr = ep.range_constraints.get(sym)
    if vr is None:
        return 0, None
    lo, hi = _finite_int(vr.lower), _finite_int(vr.upper)
    return lo or 0, hi


def _finite_int(bound: Any) -> int | None:
    """An int for a finite range bound; None for torch's int_oo (sympy's ``int()`` of it raises)."""
    try:
        value = int(bound)
    except Exception:
        return None
    return value if abs(value) < 2**62 else None


def _clamp(value: int, lo: int, hi: int | None) -> int:
    value = max(value, lo)
    return value if hi is None else min(value, hi)


def _symbol_values(
    ep: ExportedProgram, specs: list[_TensorInput], batch_size: int, at_least: int = 1
) -> dict[sympy.Symbol, int]:
    """A concrete size for each symbolic dimension: ``batch_size`` for the first input's first dimension, the
    program's example inputs' sizes for the others (8 where there are none), within the exported ranges."""
    values: dict[sympy.Symbol, int] = {}
    first = specs[0].dims[0] if specs[0].dims else None
    if isinstance(first, sympy.Symbol):
        values[first] = batch_size
    examples = _example_leaves(ep)
    for i, spec in enumerate(specs):
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, sympy.Symbol) and dim not in values:
                hint = 8
                if examples is not None and i < len(examples) and examples[i].dim() > axis:
                    hint = int(examples[i].shape[axis])
                values[dim] = hint
    for spec in specs:
        for dim in spec.dims:
            if isinstance(dim, sympy.Expr):
                for sym in dim.free_symbols:
                    lo, hi = _symbol_range(ep, sym)
                    values[sym] = _clamp(max(values.get(sym, 8), at_least), lo, hi)
    return values


def _example_leaves(ep: ExportedProgram) -> list[torch.Tensor] | None:
    if ep.example_inputs is None:
        return None
    leaves = pytree.tree_leaves(ep.example_inputs)
    return leaves if all(isinstance(t, torch.Tensor) for t in leaves) else None


def _random_tensors(ep: ExportedProgram, batch_size: int, at_least: int = 1, seed: int = 0) -> list[torch.Tensor]:
    specs = _tensor_inputs(ep)
    values = _symbol_values(ep, specs, batch_size, at_least)
    examples = _example_leaves(ep)
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for i, spec in enumerate(specs):
        shape = [d if isinstance(d, int) else int(d.subs(values)) for d in spec.dims]
        if spec.dtype.is_floating_point or spec.dtype.is_complex:
            t = torch.randn(shape, generator=gen).to(spec.dtype)
        elif spec.dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            # Integer inputs are often indices (token ids): stay within the example inputs' values.
            lo, hi = 0, 1
            if examples is not None and i < len(examples) and examples[i].numel():
                lo, hi = int(examples[i].min()), int(examples[i].max())
            t = torch.randint(lo, hi + 1, shape, generator=gen).to(spec.dtype)
        tensors.append(t)
    return tensors


def _fixed_batch(ep: ExportedProgram) -> int | None:
    first = _tensor_inputs(ep)[0]
    if not first.dims or not isinstance(first.dims[0], int):
        return None
    return first.dims[0]


def _numpy(t: Any) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    t = t.detach().cpu()
    if t.is_floating_point():
        return t.float().numpy()
    return t.numpy()


class _InputBinder:
    """Turns ``{name: array}`` into the program's ``(args, kwargs)``, in the signature's order and dtypes."""

    def __init__(self, ep: ExportedProgram) -> None:
        self.specs = _tensor_inputs(ep)
        self.in_spec = ep.call_spec.in_spec
        self.names = [s.name for s in self.specs]

    def _array(self, inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
        if name in inputs:
            return inputs[name]
        if len(self.specs) == 1:
            for alias in ("input", "inputs"):
                if alias in inputs:
                    return inputs[alias]
        raise CompressionError(
            "input_mismatch",
            f"no array named {name!r} in the data; the model's inputs are {self.names}"
            + (" (a single-input model also accepts 'input' or 'inputs')" if len(self.specs) == 1 else ""),
            {"expected_inputs": self.names, "given": sorted(inputs)},
        )

    def bind(self, inputs: dict[str, np.ndarray], device: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        flat = []
        for spec in self.specs:
            arr = self._array(inputs, spec.name)
            if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays (np.load gives those)
                arr = arr.copy()
            flat.append(torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=spec.dtype))
        return self.pack(flat)

    def pack(self, flat: list[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.in_spec is None:
            return tuple(flat), {}
        args, kwargs = pytree.tree_unflatten(flat, self.in_spec)
        return tuple(args), dict(kwargs)


class Pt2Runner:
    """Eager execution of ``ExportedProgram.module()`` under ``torch.inference_mode``.

    ``kernels`` (CUDA only; ignored on the CPU): swap Linear weights for faster CUDA layouts where they apply
    (2:4 sparse, torchao int8/int4 weight-only; see ``pt2_kernels``); ``self.kernels`` reports what was used.
    """

    def __init__(self, ep: ExportedProgram, device: str, kernels: bool = False) -> None:
        if device == "cuda":
            from torch.export.passes import move_to_device_pass

            ep = move_to_device_pass(ep, "cuda")
        self.device = device
        self.runtime = f"torch {torch.__version__.split('+')[0]} {device} (torch.export, eager)"
        self.fixed_batch = _fixed_batch(ep)
        self.input_names = [s.name for s in _tensor_inputs(ep)]
        self._binder = _InputBinder(ep)
        self.kernels: dict[str, Any] | None = None
        if kernels and device == "cuda":
            from worker.compress.pt2_kernels import with_cuda_kernels

            probe_args = self._binder.pack([t.to(device) for t in _random_tensors(ep, self.fixed_batch or 8, seed=1)])
            self.module, report = with_cuda_kernels(
                ep.module, lambda m: _tensor_leaves(m(*probe_args[0], **probe_args[1]))
            )
            self.kernels = report.as_dict()
            if report.used:
                self.runtime = self.runtime[:-1] + f"; {report.describe()})"
        else:
            self.module = ep.module()

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        args, kwargs = self._binder.bind(inputs, self.device)
        with torch.inference_mode():
            out = self.module(*args, **kwargs)
        return [_numpy(t) for t in pytree.tree_leaves(out)]

    def time_calls(self, inputs: dict[str, np.ndarray], warmup: int, runs: int) -> list[float]:
        """Milliseconds per call with the inputs already on the device, timed with CUDA events on a GPU."""
        from worker.compress.evaluate import device_call_times

        args, kwargs = self._binder.bind(inputs, self.device)
        with torch.inference_mode():
            return device_call_times(lambda: self.module(*args, **kwargs), self.device, warmup, runs)


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------------------------------
# Weights


def _weight_tensor(ep: ExportedProgram, target: str) -> torch.Tensor | None:
    t = ep.state_dict.get(target)
    if t is None:
        t = ep.constants.get(target)
    return t if isinstance(t, torch.Tensor) else None


def _weight_inputs(ep: ExportedProgram) -> Iterator[tuple[torch.fx.Node, str, torch.Tensor]]:
    """(placeholder, state_dict/constants key, tensor) for every parameter, buffer and tensor constant."""
    nodes = _placeholders(ep)
    seen: set[str] = set()
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in _WEIGHT_KINDS or spec.target is None or spec.target in seen:
            continue
        seen.add(spec.target)
        t = _weight_tensor(ep, spec.target)
        if t is not None and spec.arg.name in nodes:
            yield nodes[spec.arg.name], spec.target, t


def _counts_as_weight(node: torch.fx.Node, t: torch.Tensor) -> bool:
    if not node.users:
        return False
    if t.is_floating_point():
        # Quantization scales are floats used only as arguments 1+ of quantized_decomposed ops.
        return any(not _is_quant_op(u) or u.args[0] is node for u in node.users)
    if t.dtype in (torch.int8, torch.uint8):
        return any(_is_quant_op(u, "dequantize") and u.args[0] is node for u in node.users)
    return False


def _is_prunable(node: torch.fx.Node, t: torch.Tensor) -> bool:
    """A rank >= 2 float tensor that reaches a conv/linear weight or a matmul operand (through views only)."""
    if not t.is_floating_point() or t.dim() < 2:
        return False
    frontier, feeds_matmul = [node], False
    while frontier:
        current = frontier.pop()
        for user in current.users:
            name = _op_name(user)
            if name in _VIEW_OPS and user.args and user.args[0] is current:
                frontier.append(user)
            elif name in ("embedding", "embedding_bag"):
                return False  # tied embedding weights: pruning them would prune the embedding too
            elif name in _WEIGHT_ARGS and any(
                i < len(user.args) and user.args[i] is current for i in _WEIGHT_ARGS[name]
            ):
                feeds_matmul = True
    return feeds_matmul


def _reduction_axis(node: torch.fx.Node) -> int:
    """The axis of a weight that its consumer sums over: conv/linear input features, matmul's K."""
    for user in node.users:
        name = _op_name(user)
        if name in _CONV_OPS or name == "linear":
            return 1
        if name in ("matmul", "mm", "bmm") and user.args:
            return -1 if user.args[0] is node else -2
        if name in ("addmm", "baddbmm") and len(user.args) > 2:
            return -1 if user.args[1] is node else -2
    return -1


def _prunable_weights(ep: ExportedProgram) -> tuple[dict[str, torch.fx.Node], dict[str, torch.Tensor]]:
    """The program's prunable weights by state_dict/constants key: their placeholders and their tensors."""
    nodes = {target: node for node, target, t in _weight_inputs(ep) if _is_prunable(node, t)}
    weights = {target: t for target in nodes if (t := _weight_tensor(ep, target)) is not None}
    if not weights:
        raise CompressionError(
            "nothing_to_prune",
            "the program has no floating-point Conv/Linear/MatMul weights to prune (prune before quantizing)",
        )
    return nodes, weights


def _write_masked(
    ep: ExportedProgram, weights: dict[str, torch.Tensor], masks: dict[str, np.ndarray], dst: Path
) -> tuple[list[dict[str, Any]], int, int]:
    """Zero ``weights`` outside their keep-masks, save and check the program: (per-layer rows, zeros, total)."""
    layers = []
    zeros = total = 0
    with torch_errors("pruning_failed", "writing the pruned weights"), torch.no_grad():
        for key, t in weights.items():
            t.mul_(torch.from_numpy(masks[key]).to(device=t.device, dtype=t.dtype))
            z = t.numel() - int(torch.count_nonzero(t))
            zeros, total = zeros + z, total + t.numel()
            layers.append({"name": key, "shape": list(t.shape), "sparsity": round(z / t.numel(), 6)})
        _save(ep, dst)
    _check_runs(dst)
    return layers, zeros, total


def _weight_rows(ep: ExportedProgram) -> Iterator[dict[str, Any]]:
    """The weights the counting rule counts (module docstring), one row each. A weight stored as integer codes
    and decoded in the graph (pt2_weight_only) is one row under its codes' key, with the decoded shape."""
    from worker.compress.pt2_weight_only import coded_weights  # it imports this module

    coded, parts = coded_weights(ep)
    for node, target, t in _weight_inputs(ep):
        if target in coded:
            c = coded[target]
            op, shape, nonzero, bits, nbytes, prunable = c.consumer, c.shape, c.nonzero, c.bits, c.bytes, False
        elif target not in parts and _counts_as_weight(node, t):
            op, shape, nonzero = next((_op_name(u) for u in node.users), None), tuple(t.shape), None
            bits, nbytes, prunable = t.element_size() * 8, t.numel() * t.element_size(), _is_prunable(node, t)
            nonzero = int(torch.count_nonzero(t.detach()))
        else:
            continue
        numel = math.prod(shape)
        yield {
            "name": target,
            "op": op,
            "shape": list(shape),
            "parameters": numel,
            "nonzero": nonzero,
            "sparsity": round(1 - nonzero / numel, 6) if numel else 0.0,
            "bits": bits,
            "bytes": nbytes,
            "prunable": prunable,
        }


def _save(ep: ExportedProgram, dst: Path) -> None:
    # Saved under its final name: torch.export.save names the archive's root folder after the file.
    try:
        torch.export.save(ep, str(dst))
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def _check_runs(path: Path) -> None:
    """Load a written program and run it once, so a broken artifact fails the step that wrote it."""
    ep = _load(path)
    runner = Pt2Runner(ep, "cpu")
    tensors = _random_tensors(ep, runner.fixed_batch or 2)
    inputs = {s.name: _numpy(t) for s, t in zip(_tensor_inputs(ep), tensors, strict=True)}
    with torch_errors("invalid_output", "running the written model"):
        runner(inputs)


# ----------------------------------------------------------------------------------------------------
# Re-export of a transformed module with the original program's input signature


def _dynamic_shapes(ep: ExportedProgram, module: torch.nn.Module, flat: list[torch.Tensor]) -> Any:
    """The original program's dynamic dimensions (same symbol -> same Dim, same ranges) for ``flat``."""
    dims: dict[sympy.Symbol, Any] = {}
    collection = torch.export.ShapesCollection()
    for spec, t in zip(_tensor_inputs(ep), flat, strict=True):
        spec_dims = {}
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                continue
            if isinstance(dim, sympy.Symbol):
                if dim not in dims:
                    lo, hi = _symbol_range(ep, dim)
                    dims[dim] = torch.export.Dim(f"d_{dim}", min=lo, max=hi)
                spec_dims[axis] = dims[dim]
            else:  # derived dimension (e.g. 2*s0): let export work it out again
                spec_dims[axis] = torch.export.Dim.AUTO
        if spec_dims:
            collection[t] = spec_dims
    binder = _InputBinder(ep)
    args, kwargs = binder.pack(flat)
    return args, kwargs, collection.dynamic_shapes(module, args, kwargs)


def _reexport(ep: ExportedProgram, module: torch.nn.Module, dst: Path) -> None:
    # Example sizes of at least 2: export specializes dynamic dimensions whose example is 0 or 1.
    flat = _random_tensors(ep, 4, at_least=2)
    args, kwargs, dynamic_shapes = _dynamic_shapes(ep, module, flat)
    with torch_errors("export_failed", "re-exporting the transformed model with torch.export"):
        new_ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        _save(new_ep, dst)


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> int:
    """Delete parameters/buffers/tensor attributes no get_attr reads; returns bytes dropped.

    After ``convert_pt2e`` the fp32 weights stay on the module next to their int8 copies; re-exporting would
    store both (the file gets larger than the fp32 original).
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if name in used:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, leaf):
            dropped += t.numel() * t.element_size()
            delattr(owner, leaf)
    return dropped


# ----------------------------------------------------------------------------------------------------
# Quantization helpers


def _x86_config(dynamic: bool, per_channel: bool) -> Any:
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(is_dynamic=dynamic)
    if per_channel:
        return config
    weight = dataclasses.replace(
        config.weight,
        qscheme=torch.per_tensor_symmetric,
        ch_axis=None,
        observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12),
    )
    return dataclasses.replace(config, weight=weight)


def _calibration_batches(
    ep: ExportedProgram, data: EvalData | None, samples: int
) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    binder = _InputBinder(ep)
    if data is None:
        yield binder.pack(_random_tensors(ep, _fixed_batch(ep) or 8))
        return
    data = data.head(samples)
    fixed = _fixed_batch(ep)
    bs = fixed or _CALIBRATION_BATCH
    for start in range(0, data.num_samples, bs):
        batch = {k: v[start : start + bs] for k, v in data.inputs.items()}
        real = len(next(iter(batch.values())))
        if fixed and real < fixed:
            batch = {k: np.concatenate([v, np.repeat(v[:1], fixed - real, axis=0)]) for k, v in batch.items()}
        yield binder.bind(batch, "cpu")


def _quantized_layers(gm: torch.fx.GraphModule) -> tuple[list[dict[str, Any]], list[str]]:
    """Conv and linear nodes whose weight is dequantized from int8, and those left in floating point."""
    quantized, left = [], []
    for node in gm.graph.nodes:
        name = _op_name(node)
        if name not in _CONV_OPS and name != "linear":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        layer = next(reversed(stack.values()))[0] if stack else node.name
        weight = node.args[1] if len(node.args) > 1 else None
        if isinstance(weight, torch.fx.Node) and _is_quant_op(weight, "dequantize"):
            src = weight.args[0]
            shape = None
            if isinstance(src, torch.fx.Node) and src.op == "get_attr":
                shape = list(_attr(gm, str(src.target)).shape)
            granularity = "per_channel" if "per_channel" in str(weight.target) else "per_tensor"
            quantized.append({"name": layer, "op": name, "shape": shape, "granularity": granularity})
        else:
            left.append(f"{layer} ({name})")
    return quantized, left


def _attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _to_half_graph(gm: torch.fx.GraphModule, dtype: torch.dtype) -> None:
    """Compute in ``dtype`` (float16 or bfloat16) while the signature keeps its dtypes: cast floating inputs to it
    after the placeholders, floating weights to it, dtype=float32 arguments inside to it, and outputs back."""
    graph = gm.graph
    gm.to(dtype)  # floating parameters and buffers only
    for node in graph.nodes:
        if node.op == "get_attr":
            owner_path, _, leaf = str(node.target).rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            value = getattr(owner, leaf, None)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
                setattr(owner, leaf, value.to(dtype))  # plain tensor constants, not registered as buffers
        elif node.op == "call_function":
            node.args = tuple(dtype if a is torch.float32 else a for a in node.args)
            node.kwargs = {k: dtype if v is torch.float32 else v for k, v in node.kwargs.items()}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last = placeholders[-1]
    for ph in reversed(placeholders):
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            with graph.inserting_after(last):
                cast = graph.call_function(torch.ops.aten._to_copy.default, (ph,), {"dtype": dtype})
            ph.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)
    output = next(n for n in graph.nodes if n.op == "output")

    def back(arg: Any) -> Any:
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            with graph.inserting_before(output):
                return graph.call_function(torch.ops.aten._to_copy.default, (arg,), {"dtype": val.dtype})
        return arg

    output.args = torch.fx.node.map_arg(output.args, back)
    graph.lint()
    gm.recompile()


# ----------------------------------------------------------------------------------------------------
# The backend


class Pt2Backend:
    """FormatBackend for torch.export programs."""

    name = "pt2"
    suffix = ".pt2"

    def open_runner(self, path: Path, device: str, kernels: bool = False) -> Pt2Runner:
        return self._runner(_load(path), device, kernels)

    def _runner(self, ep: ExportedProgram, device: str, kernels: bool = False) -> Pt2Runner:
        if device == "cuda" and not torch.cuda.is_available():
            raise CompressionError("device_unavailable", "CUDA was requested but this worker has no usable GPU")
        if device not in ("cpu", "cuda"):
            raise CompressionError("device_unavailable", f"unknown device {device!r}")
        with torch_errors("invalid_model", "preparing the program for execution"):
            return Pt2Runner(ep, device, kernels)

    def open_kernel_runner(self, path: Path, device: str) -> Pt2Runner:
        """``open_runner`` with the CUDA kernel swaps (``pt2_kernels``) on a GPU; the same as it on the CPU."""
        return self.open_runner(path, device, kernels=True)

    def stored_size(self, path: Path) -> int:
        return path.stat().st_size

    def count_parameters(self, path: Path) -> tuple[int, int]:
        rows = list(_weight_rows(_load(path)))
        return sum(r["parameters"] for r in rows), sum(r["nonzero"] for r in rows)

    def example_inputs(self, path: Path, batch_size: int) -> dict[str, np.ndarray]:
        ep = _load(path)
        tensors = _random_tensors(ep, batch_size)
        return {s.name: _numpy(t) for s, t in zip(_tensor_inputs(ep), tensors, strict=True)}

    def prune_magnitude(self, src: Path, dst: Path, step: PruneMagnitude, ctx: StepContext | None = None) -> StepReport:
        ep = _load(src)
        nodes, weights = _prunable_weights(ep)
        masks = step_masks(
            {k: np.abs(t.detach().float().cpu().numpy()) for k, t in weights.items()},
            sparsity=step.target_sparsity,
            scope=step.scope,
            pattern=parse_pattern(step.pattern) if step.pattern else None,
            overrides=step.overrides,
            reduction_axes={k: _reduction_axis(node) for k, node in nodes.items()},
        )
        layers, zeros, total = _write_masked(ep, weights, masks, dst)
        return magnitude_report(step, layers, zeros, total)

    # Training steps live in pt2_training (it imports this module).
    def prune_gradient(self, src: Path, dst: Path, step: PruneGradient, ctx: StepContext) -> StepReport:
        from worker.compress import pt2_training

        return pt2_training.prune_gradient(src, dst, step, ctx)

    def prune_regularized(self, src: Path, dst: Path, step: PruneRegularized, ctx: StepContext) -> StepReport:
        from worker.compress import pt2_training

        return pt2_training.prune_regularized(src, dst, step, ctx)

    def finetune_distill(self, src: Path, dst: Path, step: Finetune, ctx: StepContext) -> StepReport:
        from worker.compress import pt2_training

        return pt2_training.finetune(src, dst, step, ctx)

    def finetune_labels(self, src: Path, dst: Path, step: Finetune, ctx: StepContext) -> StepReport:
        from worker.compress import pt2_training

        return pt2_training.finetune(src, dst, step, ctx)

    def layers(self, path: Path) -> list[dict[str, Any]]:
        """One row per weight tensor: name, consuming op, shape, parameters, nonzero, sparsity, bits, bytes."""
        return list(_weight_rows(_load(path)))

    def prunable_weights(self, path: Path) -> dict[str, tuple[np.ndarray, int]]:
        """The weights pruning acts on, each with its reduction axis (for N:M and per-channel arithmetic)."""
        ep = _load(path)
        return {
            target: (t.detach().float().cpu().numpy(), _reduction_axis(node))
            for node, target, t in _weight_inputs(ep)
            if _is_prunable(node, t)
        }

    def weight_swapper(self, path: Path, device: str) -> ModuleWeightSwapper[Pt2Runner]:
        """One runner whose prunable weights are swapped in place (see ``weight_swap``), for per-layer sensitivity.

        The runner executes ``ep.module()``, whose tensors sit at their state_dict/constants keys."""
        ep = _load(path)
        prunable = [target for node, target, t in _weight_inputs(ep) if _is_prunable(node, t)]
        runner = self._runner(ep, device)
        live = {target: tensor_at(runner.module, target) for target in prunable}
        return ModuleWeightSwapper(runner, {target: t for target, t in live.items() if t is not None})

    def with_weights(self, src: Path, dst: Path, weights: dict[str, np.ndarray]) -> None:
        """Write ``src`` to ``dst`` with the named weights replaced (same dtype and shape)."""
        ep = _load(src)
        with torch.no_grad():
            for target, values in weights.items():
                t = _weight_tensor(ep, target)
                assert t is not None
                t.copy_(torch.from_numpy(np.ascontiguousarray(values)).to(dtype=t.dtype, device=t.device))
        _save(ep, dst)

    def convert_onnx(self, src: Path, dst: Path, step: ConvertOnnx, ctx: StepContext) -> StepReport:
        """torch.onnx's dynamo exporter on the program itself: its dynamic dimensions (the batch) stay dynamic."""
        import sys

        from worker.compress.convert import onnx_conversion_report

        ep = _load(src)
        runner = Pt2Runner(ep, "cpu")
        if ctx.data is None or runner.fixed_batch is not None:
            tensors = _random_tensors(ep, runner.fixed_batch or 2)
            inputs = {s.name: _numpy(t) for s, t in zip(_tensor_inputs(ep), tensors, strict=True)}
        else:
            head = ctx.data.head(8).inputs
            inputs = {name: runner._binder._array(head, name) for name in runner.input_names}
        expected = runner(inputs)
        # The exporter reports progress with print(); stdout is the sandbox's result channel.
        with (
            torch_errors("conversion_failed", "ONNX export (torch.onnx, dynamo)"),
            contextlib.redirect_stdout(sys.stderr),
        ):
            program = torch.onnx.export(ep, dynamo=True, opset_version=step.opset, verbose=False)
            assert program is not None
            program.save(str(dst))
        report = onnx_conversion_report(
            dst,
            inputs,
            expected,
            exporter=f"torch.onnx {torch.__version__.split('+')[0]} (dynamo exporter, from the ExportedProgram)",
            opset=step.opset,
        )
        if runner.fixed_batch is not None:
            report.notes.append(
                f"The program's batch dimension is static ({runner.fixed_batch}); so is the ONNX model's."
            )
        return report

    def quantize(self, src: Path, dst: Path, step: QuantizeStepT, data: EvalData | None, device: str) -> StepReport:
        if isinstance(step, QuantizeFp16):
            return self._sized(src, dst, step.method, lambda ep: self._half(ep, dst, "fp16"))
        return self._sized(src, dst, step.method, lambda ep: self._int8_pt2e(ep, dst, step, data, device))

    def quantize_bf16(self, src: Path, dst: Path, step: QuantizeBf16, ctx: StepContext) -> StepReport:
        return self._sized(src, dst, step.method, lambda ep: self._half(ep, dst, "bf16"))

    def quantize_int8_weight_only(
        self, src: Path, dst: Path, step: QuantizeInt8WeightOnly, ctx: StepContext
    ) -> StepReport:
        from worker.compress.pt2_weight_only import quantize_weight_only

        return self._sized(src, dst, step.method, lambda ep: quantize_weight_only(ep, dst, step))

    def quantize_int4_weight_only(
        self, src: Path, dst: Path, step: QuantizeInt4WeightOnly, ctx: StepContext
    ) -> StepReport:
        from worker.compress.pt2_weight_only import quantize_weight_only

        return self._sized(src, dst, step.method, lambda ep: quantize_weight_only(ep, dst, step))

    def _sized(self, src: Path, dst: Path, method: str, write: Callable[[ExportedProgram], StepReport]) -> StepReport:
        """Run ``write`` on the loaded ``src`` (it writes ``dst``), check the result runs, add sizes to the report."""
        before = self.stored_size(src)
        report = write(_load(src))
        _check_runs(dst)
        after = self.stored_size(dst)
        report.details |= {
            "bytes_before": before,
            "bytes_after": after,
            "size_ratio": round(after / before, 4),
        }
        if after >= before:
            report.notes.append(f"{method}: the output .pt2 is not smaller than its input ({after} vs {before} bytes).")
        return report

    def _int8_pt2e(
        self,
        ep: ExportedProgram,
        dst: Path,
        step: QuantizeInt8Static | QuantizeInt8Dynamic,
        data: EvalData | None,
        device: str,
    ) -> StepReport:
        # PT2E with X86InductorQuantizer for both methods: in torchao 0.18 on CPU the dynamic config quantizes
        # Conv as well as Linear weights (per-channel int8, activations quantized on the fly) and the result
        # re-exports to a .pt2 that torch.export.load reads after `import torchao`. torchao's quantize_ with
        # Int8DynamicActivationInt8WeightConfig would need an nn.Module (the program has none) and covers
        # Linear only.
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

        static = isinstance(step, QuantizeInt8Static)
        if static and data is None:
            raise CompressionError(
                "dataset_required", "int8_static calibrates activation ranges on a dataset; the job has none"
            )
        notes = []
        if device == "cuda":
            notes.append("Quantized and calibrated on the CPU: X86InductorQuantizer targets x86 kernels.")
        samples = step.calibration_samples if static else 0
        with torch_errors("quantization_failed", f"{step.method} quantization (torchao PT2E)"):
            quantizer = X86InductorQuantizer().set_global(_x86_config(not static, step.per_channel))
            prepared = prepare_pt2e(ep.module(), quantizer)
            with torch.no_grad():
                for args, kwargs in _calibration_batches(ep, data if static else None, samples):
                    prepared(*args, **kwargs)
            converted = convert_pt2e(prepared)
            dropped = _drop_unused_attributes(converted)
            layers, left = _quantized_layers(converted)
        if not layers:
            raise CompressionError("nothing_to_quantize", "no Conv or Linear layer of the program was quantized")
        if left:
            notes.append(f"Left in floating point: {', '.join(left)}.")
        if not static:
            notes.append(
                "int8_dynamic quantizes the weights of Conv and Linear layers to int8 and their input "
                "activations per batch at run time; in eager mode (no torch.compile) that is slower "
                "than fp32."
            )
        _reexport(ep, converted, dst)
        details: dict[str, Any] = {
            "method": step.method,
            "per_channel": step.per_channel,
            "quantized_layers": len(layers),
            "layers": layers,
            "dropped_float_bytes": dropped,
        }
        if static and data is not None:
            details["calibration_samples"] = min(samples, data.num_samples)
        return StepReport(op="quantize", method=step.method, details=details, notes=notes)

    def _half(self, ep: ExportedProgram, dst: Path, method: Literal["fp16", "bf16"]) -> StepReport:
        dtype = torch.float16 if method == "fp16" else torch.bfloat16
        with torch_errors("quantization_failed", f"{method} conversion"):
            gm = ep.module()
            _to_half_graph(gm, dtype)
            halves = sum(1 for t in [*gm.parameters(), *gm.buffers()] if t.dtype == dtype)  # now stored in half
        _reexport(ep, gm, dst)
        return StepReport(
            op="quantize",
            method=method,
            details={"method": method, "half_tensors": halves},
            notes=[
                f"Weights and compute in {dtype}; inputs and outputs keep their dtype. CPU {method} kernels can be "
                "slower than float32 (see the latency)."
            ],
        )
