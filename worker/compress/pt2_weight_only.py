"""Weight-only int8 and int4 quantization of torch.export programs, stored as integers and decoded in the graph.

The codes and scales come from torchao's affine quantization primitives (``choose_qparams_affine`` and
``quantize_affine``, the ones behind its Int8/Int4WeightOnlyConfig). How they are stored and run is ours,
because torchao's own routes do not fit an exported program on CPU (measured, torch 2.13 / torchao 0.18):
``quantize_`` swaps ``nn.Linear`` modules and a program's module has none (its linears are ``aten.linear``
calls on attributes); Int4WeightOnlyConfig needs the mslk package on CPU; IntxWeightOnlyConfig(int4) keeps one
int4 per int8 (no size gain); and torch's packed CPU kernels (``_weight_int4pack_mm_for_cpu``,
``_weight_int8pack_mm``) run 100-1000x slower than a float32 linear in eager mode with float32 activations.

What the program stores, per quantized ``[N, K]`` weight (K padded with zeros to K', a multiple of the group):
- int8: int8 codes ``[N, K']``, float16 scales ``[N, K'/group]`` (one group per row when group_size is None);
  symmetric, zero maps to zero.
- int4: uint8 ``[N, K'/2]``, two codes per byte (low nibble: even column), float16 scales ``[N, K'/group]``;
  symmetric codes are signed nibbles; asymmetric adds uint8 zero points ``[N, K'/group]``. Zero weights stay
  exactly zero either way (zero quantizes to the zero point).
The graph decodes them with ordinary aten ops (shifts, masks, a multiply) right before the ``linear`` (or
``embedding``) that reads the weight, so the artifact loads with plain ``torch.export.load`` (no torchao import)
and costs one elementwise decode of the weight per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from app.jobs.spec import QuantizeInt4WeightOnly, QuantizeInt8WeightOnly
from worker.compress.pruning import layer_overrides
from worker.compress.pt2_format import (
    _WEIGHT_ARGS,
    _attr,
    _is_quant_op,
    _op_name,
    _reexport,
    _weight_inputs,
)
from worker.compress.types import CompressionError, StepReport, torch_errors

_SCALE_DTYPE = torch.float16
_MIN_SCALE = 2.0**-14  # float16's smallest normal number: smaller scales would lose precision as subnormals


def decode_int8(codes: torch.Tensor, scales: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, K']`` int8 codes times their group's scale, cut back to ``in_features`` columns."""
    n, padded = codes.shape
    groups = scales.shape[1]
    w = codes.to(dtype).reshape(n, groups, padded // groups) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(n, padded)[:, :in_features]


def decode_int4(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """Unpack two codes per byte; signed nibbles (symmetric) or codes minus their group's zero point."""
    n = packed.shape[0]
    groups = scales.shape[1]
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, groups, -1)
    # Symmetric codes are two's-complement nibbles: 0..7 stay, 8..15 become -8..-1.
    values = (codes ^ 8).to(dtype) - 8 if zeros is None else codes.to(dtype) - zeros.to(dtype).unsqueeze(-1)
    w = values * scales.to(dtype).unsqueeze(-1)
    return w.reshape(n, -1)[:, :in_features]


@dataclass(frozen=True)
class _Encoded:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


def encode(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = True) -> _Encoded:
    """Quantize a 2-D weight in groups along its input axis with torchao's primitives (see the module doc)."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    n, k = weight.shape
    group = group_size or k
    pad = (-k) % group
    if bits == 4 and (k + pad) % 2:
        pad += group  # an odd single group (per-row int4): pad once more so codes pair up into bytes
    w = torch.nn.functional.pad(weight.detach().float(), (0, pad))
    block = (1, group)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    scale, zero = choose_qparams_affine(w, mapping, block, torch.int8 if symmetric else torch.uint8, qmin, qmax)
    # Quantize with the scale as stored (float16), so decoding reproduces exactly what was quantized.
    scale = scale.clamp(_MIN_SCALE, torch.finfo(_SCALE_DTYPE).max).to(_SCALE_DTYPE).reshape(n, -1)
    zero = zero.reshape(n, -1).round().clamp(qmin, qmax).to(torch.int32)
    codes = quantize_affine(w, block, scale.float(), zero, torch.int32, qmin, qmax)
    if bits == 8:
        return _Encoded(codes.to(torch.int8), scale, None)
    nibbles = (codes & 15).to(torch.uint8)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return _Encoded(packed.contiguous(), scale, None if symmetric else zero.to(torch.uint8))


def _use(user: torch.fx.Node, node: torch.fx.Node) -> str | None:
    """How ``user`` reads the weight ``node``: as a linear's weight, an embedding's table, or otherwise (None)."""
    name = _op_name(user)
    if name == "linear" and len(user.args) > 1 and user.args[1] is node and node not in user.args[2:]:
        return "linear"
    if name == "embedding" and user.args and user.args[0] is node and node not in user.args[1:]:
        return "embedding"
    return None


def quantize_weight_only(
    ep: ExportedProgram, dst: Path, step: QuantizeInt8WeightOnly | QuantizeInt4WeightOnly
) -> StepReport:
    """Replace each Linear weight (and embedding tables when included) by stored codes and an in-graph decode."""
    bits = 4 if isinstance(step, QuantizeInt4WeightOnly) else 8
    symmetric = step.symmetric if isinstance(step, QuantizeInt4WeightOnly) else True
    wanted = {"linear", *step.include}
    layers: list[dict[str, Any]] = []
    left: list[str] = []
    with torch_errors("quantization_failed", f"{step.method} quantization"):
        gm = ep.module()
        graph = gm.graph
        reads: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                reads[str(node.target)] = reads.get(str(node.target), 0) + 1
        for node in list(graph.nodes):
            if node.op != "get_attr" or not node.users:
                continue
            value = _attr(gm, str(node.target))
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 2:
                continue
            uses = {_use(u, node) for u in node.users}
            if not uses & {"linear", "embedding"}:
                continue
            if None in uses or not uses <= wanted or reads[str(node.target)] != 1:
                left.append(f"{node.target} ({', '.join(sorted(u or 'other' for u in uses))})")
                continue
            if step.exclude and layer_overrides([str(node.target)], dict.fromkeys(step.exclude, 0.0)):
                left.append(f"{node.target} (excluded by the step)")
                continue
            layers.append(_replace(gm, node, value, bits, step.group_size, symmetric))
        graph.lint()
        gm.recompile()
    if not layers:
        raise CompressionError(
            "nothing_to_quantize",
            f"{step.method}: the program has no floating-point Linear weights read by aten.linear"
            + (" or embedding tables" if "embedding" in wanted else ""),
        )
    _reexport(ep, gm, dst)
    notes = [
        f"{step.method}: {len(layers)} weight(s) stored as {bits}-bit codes with float16 scales and decoded in the "
        "graph before each use (plain torch ops: the .pt2 loads with torch.export.load alone). Smaller on disk; in "
        "eager mode each call decodes the weights, so it is not faster than float32."
    ]
    if left:
        notes.append(f"Left in floating point: {', '.join(left)}.")
    details = {
        "method": step.method,
        "bits": bits,
        "group_size": step.group_size,
        "symmetric": symmetric,
        "quantized_layers": len(layers),
        "layers": layers,
    }
    return StepReport(op="quantize", method=step.method, details=details, notes=notes)


def _replace(
    gm: torch.fx.GraphModule, node: torch.fx.Node, value: torch.Tensor, bits: int, group: int | None, symmetric: bool
) -> dict[str, Any]:
    target = str(node.target)
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    enc = encode(value, bits, group, symmetric)
    stored = {f"{leaf}_int{bits}": enc.codes, f"{leaf}_scale": enc.scales}
    if enc.zeros is not None:
        stored[f"{leaf}_zero"] = enc.zeros
    graph = gm.graph
    first_user = min(node.users, key=lambda u: list(graph.nodes).index(u))
    args: list[Any] = []
    with graph.inserting_before(first_user):
        for name, tensor in stored.items():
            if hasattr(owner, name):
                raise CompressionError("quantization_failed", f"{target}: the program already has {name}")
            owner.register_buffer(name, tensor)
            args.append(graph.get_attr(f"{owner_path}.{name}" if owner_path else name))
        if bits == 8:
            decoded = graph.call_function(decode_int8, (args[0], args[1], value.shape[1], value.dtype))
        else:
            zeros = args[2] if len(args) > 2 else None
            decoded = graph.call_function(decode_int4, (args[0], args[1], zeros, value.shape[1], value.dtype))
    node.replace_all_uses_with(decoded)
    graph.erase_node(node)
    delattr(owner, leaf)
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    return {
        "name": target,
        "shape": list(value.shape),
        "bits": bits,
        "group_size": group,
        "bytes_before": value.numel() * value.element_size(),
        "bytes_after": stored_bytes,
    }


# ----------------------------------------------------------------------------------------------------
# Counting (Pt2Backend.count_parameters and layers): a stored weight is its decoded tensor


@dataclass(frozen=True)
class CodedWeight:
    consumer: str  # the op that reads the decoded weight: linear, embedding...
    shape: tuple[int, ...]
    nonzero: int
    bits: int  # storage bits per weight of its integer codes
    bytes: int  # codes, scales and zero points together


def coded_weights(ep: ExportedProgram) -> tuple[dict[str, CodedWeight], set[str]]:
    """Weights stored as integer codes and decoded in the graph (not by quantized_decomposed ops, which the
    counting rule handles itself): {code tensor's key: what it decodes to}, and the keys of every stored part
    (codes, scales, zero points), which are not weights on their own."""
    placeholders = {node.name: (node, key, t) for node, key, t in _weight_inputs(ep)}
    coded: dict[str, CodedWeight] = {}
    parts: set[str] = set()
    for user in ep.graph.nodes:
        name = _op_name(user)
        positions = (0,) if name in ("embedding", "embedding_bag") else _WEIGHT_ARGS.get(name or "", ())
        for i in positions:
            arg = user.args[i] if i < len(user.args) else None
            if not isinstance(arg, torch.fx.Node) or arg.op == "placeholder":
                continue
            cone = _ancestors(arg)
            inputs = [n for n in cone if n.op == "placeholder"]
            if not inputs or any(n.name not in placeholders for n in inputs):
                continue  # reads a user input: an activation, not a stored weight
            if any(_is_quant_op(n) for n in cone):
                continue
            ints = [placeholders[n.name] for n in inputs if placeholders[n.name][2].dtype in (torch.int8, torch.uint8)]
            if not ints:
                continue
            decoded = _evaluate(ep, arg, cone, {n: placeholders[n.name][2] for n in inputs})
            _, code_key, codes = max(ints, key=lambda item: item[2].numel())
            coded[code_key] = CodedWeight(
                consumer=name or "",
                shape=tuple(decoded.shape),
                nonzero=int(torch.count_nonzero(decoded)),
                bits=round(8 * codes.numel() * codes.element_size() / max(decoded.numel(), 1)),
                bytes=sum(placeholders[n.name][2].numel() * placeholders[n.name][2].element_size() for n in inputs),
            )
            parts.update(placeholders[n.name][1] for n in inputs)
    return coded, parts


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _evaluate(
    ep: ExportedProgram, out: torch.fx.Node, cone: set[torch.fx.Node], values: dict[torch.fx.Node, torch.Tensor]
) -> torch.Tensor:
    env: dict[torch.fx.Node, Any] = dict(values)
    with torch.no_grad():
        for node in ep.graph.nodes:
            if node in cone and node not in env:
                args = torch.fx.node.map_arg(node.args, env.__getitem__)
                kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                env[node] = node.target(*args, **kwargs)
    return env[out]
