"""Faster CUDA kernels for a loaded program's Linear layers, used when a job's result is measured on CUDA.

The artifact a job writes stays portable (dense weights, or int8/int4 codes decoded by plain aten ops: see
``pt2_weight_only``), because the fast layouts below exist only on CUDA and only as tensor subclasses that a
``.pt2`` cannot carry. What this module changes is the *measured* module: the copy ``Pt2Runner`` runs on the GPU.

- 2:4 semi-structured sparsity: a Linear weight whose every group of 4 consecutive input weights holds at most 2
  non-zeros, in float16/bfloat16, becomes ``torch.sparse`` ``SparseSemiStructuredTensor`` (cuSPARSELt, or CUTLASS
  where torch has no cuSPARSELt), the layout of ``to_sparse_semi_structured``. Needs compute capability 8.0+.
- Weight-only int8 / int4 (our stored codes): the decode before each Linear is replaced by a torchao weight tensor
  built from the very same codes and scales: ``Int8Tensor`` (per-row int8) and ``Int4TilePackedTo4dTensor``
  (tinygemm's ``_weight_int4pack_mm``; groups of 32-256, compute capability 8.0+, bfloat16 activations inside).

Every swap is checked before it is kept: a weight is converted only if the codes reproduce the graph's own decoded
weight, and the converted module must give the dense module's outputs on probe inputs (cosine >= ``MIN_COSINE``);
otherwise the runner keeps the dense module and the report says why. Nothing here runs for a CPU job:
``Pt2Runner`` calls it only with ``device == "cuda"``. The graph surgery itself is device-agnostic (tests drive it
on the CPU with stand-in converters); only the converters need CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from worker.compress.pt2_format import _attr
from worker.compress.pt2_weight_only import _ancestors, decode_int4, decode_int8

MIN_COSINE = 0.995  # bf16 activations (tinygemm) and fp16 accumulation order stay far above this on real models
TINYGEMM_GROUPS = (32, 64, 128, 256)
_MAX_LISTED = 20  # skipped layers named in a report; the rest are counted

Converter = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class KernelReport:
    """Which Linear weights run on which kernel, and why others do not."""

    semi_structured: list[str] = field(default_factory=list)
    int8: list[str] = field(default_factory=list)
    int4: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str | None = None  # 2:4 backend: "cusparselt" | "cutlass"
    check_cosine: float | None = None
    fallback: str | None = None  # set when the converted module was dropped for the dense one

    @property
    def used(self) -> bool:
        return self.fallback is None and bool(self.semi_structured or self.int8 or self.int4)

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason

    def describe(self) -> str:
        """One clause for the runner's ``runtime`` string."""
        if not self.used:
            return ""
        parts = []
        if self.semi_structured:
            parts.append(f"2:4 sparse kernels ({self.backend}) on {len(self.semi_structured)} Linear weight(s)")
        if self.int4:
            parts.append(f"torchao int4 tinygemm on {len(self.int4)}")
        if self.int8:
            parts.append(f"torchao int8 weight-only on {len(self.int8)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        listed = dict(list(self.skipped.items())[:_MAX_LISTED])
        return {
            "used": self.used,
            "semi_structured_2_4": len(self.semi_structured) if self.fallback is None else 0,
            "torchao_int8": len(self.int8) if self.fallback is None else 0,
            "torchao_int4": len(self.int4) if self.fallback is None else 0,
            "semi_structured_backend": self.backend,
            "check_cosine": None if self.check_cosine is None else round(self.check_cosine, 6),
            "fallback": self.fallback,
            "skipped": listed,
            "skipped_more": max(0, len(self.skipped) - len(listed)),
        }


# ----------------------------------------------------------------------------------------------------
# Graph helpers


def _is_linear(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.aten.linear.default, F.linear)


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    owner_path, _, leaf = target.rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), leaf


def _evaluate(gm: torch.fx.GraphModule, out: torch.fx.Node, cone: set[torch.fx.Node]) -> torch.Tensor:
    """The value of ``out`` from the module's attributes (``cone``: ``out`` and its ancestors, none an input)."""
    env: dict[torch.fx.Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node not in cone:
                continue
            if node.op == "get_attr":
                env[node] = _attr(gm, str(node.target))
            else:
                args = torch.fx.node.map_arg(node.args, env.__getitem__)
                kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
    return env[out]


def _layer_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(next(reversed(stack.values()))[0]) if stack else node.name


# ----------------------------------------------------------------------------------------------------
# 2:4 semi-structured sparsity


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive weights along the input axis (what the kernels keep)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    nonzero = (weight != 0).reshape(weight.shape[0], -1, 4).sum(dim=-1)
    return bool((nonzero <= 2).all())


def semi_structured_converter() -> tuple[str, Converter]:
    """torch's 2:4 layout for this GPU: cuSPARSELt when torch was built with it, else CUTLASS."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    if torch.backends.cusparselt.is_available():
        return "cusparselt", SparseSemiStructuredTensorCUSPARSELT.from_dense
    return "cutlass", SparseSemiStructuredTensorCUTLASS.from_dense


def use_semi_structured(gm: torch.fx.GraphModule, convert: Converter, report: KernelReport) -> None:
    """Swap each exactly-2:4 float16/bfloat16 Linear weight of ``gm`` for ``convert(weight)`` (in place)."""
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not node.users:
            continue
        value = _attr(gm, str(node.target))
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            continue
        users = list(node.users)
        if not any(_is_linear(u) and u.args[1] is node for u in users) or not is_two_four(value):
            continue  # not a 2:4-pruned Linear weight: nothing to say about it
        name = str(node.target)
        if not all(_is_linear(u) and u.args[1] is node and node not in (u.args[0], *u.args[2:]) for u in users):
            report.skip(name, "read by ops other than linear")
        elif value.dtype not in (torch.float16, torch.bfloat16):
            report.skip(name, f"{value.dtype} weights: the 2:4 kernels need float16/bfloat16 (add quantize/fp16)")
        else:
            try:
                sparse = convert(value.detach().contiguous())
            except Exception as exc:  # shape/dtype/arch limits of the kernels, in torch's words
                report.skip(name, f"{type(exc).__name__}: {exc}"[:300])
                continue
            owner, leaf = _owner(gm, name)
            if isinstance(getattr(owner, leaf), torch.nn.Parameter):
                setattr(owner, leaf, torch.nn.Parameter(sparse, requires_grad=False))
            else:
                setattr(owner, leaf, sparse)
            report.semi_structured.append(name)


# ----------------------------------------------------------------------------------------------------
# Weight-only int8 / int4 codes (pt2_weight_only's storage)


@dataclass(frozen=True)
class StoredCodes:
    """The stored parts of one coded Linear weight, recognised from its decode's inputs."""

    bits: int
    codes: torch.Tensor  # int8 [N, K'] or uint8 [N, K'/2] (low nibble: even column)
    scales: torch.Tensor  # [N, groups]
    zeros: torch.Tensor | None  # uint8 [N, groups] (asymmetric int4)
    in_features: int

    @property
    def group(self) -> int:
        width = self.codes.shape[1] * (2 if self.bits == 4 else 1)
        return width // self.scales.shape[1]


def stored_codes(parts: list[torch.Tensor], in_features: int) -> StoredCodes | None:
    """Which tensor is the codes, the scales and the zero points; None if they are not ``pt2_weight_only``'s."""
    floats = [t for t in parts if t.is_floating_point()]
    ints = sorted((t for t in parts if t.dtype in (torch.int8, torch.uint8)), key=lambda t: -t.numel())
    if len(floats) != 1 or not ints or len(parts) != len(floats) + len(ints) or len(ints) > 2:
        return None
    scales, codes = floats[0], ints[0]
    if codes.dim() != 2 or scales.dim() != 2 or codes.shape[0] != scales.shape[0]:
        return None
    if codes.dtype == torch.int8 and len(ints) == 1:
        return StoredCodes(8, codes, scales, None, in_features)
    if codes.dtype == torch.uint8:
        zeros = ints[1] if len(ints) == 2 else None
        if zeros is not None and (zeros.dtype != torch.uint8 or zeros.shape != scales.shape):
            return None
        return StoredCodes(4, codes, scales, zeros, in_features)
    return None


def decode(codes: StoredCodes) -> torch.Tensor:
    """The float32 weight the codes stand for (``pt2_weight_only``'s own decode)."""
    if codes.bits == 8:
        return decode_int8(codes.codes, codes.scales, codes.in_features, torch.float32)
    return decode_int4(codes.codes, codes.scales, codes.zeros, codes.in_features, torch.float32)


def tinygemm_qparams(codes: StoredCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N', K''] int32 in 0..15, scale [N', K''/g], zero [N', K''/g]) in tinygemm's terms, padded as torchao's
    ``Int4TilePackedTo4dTensor`` pads (N to a multiple of 8, K to a multiple of 1024).

    tinygemm decodes ``(q - 8) * scale + zero``. Our symmetric codes c (signed nibbles) are ``c * s``: q = c + 8,
    zero = 0. Asymmetric codes u with zero point zp are ``(u - zp) * s``: q = u, zero = (8 - zp) * s. Padding
    decodes to 0 (q = 8, zero = 0).
    """
    n = codes.codes.shape[0]
    nibbles = torch.stack([codes.codes & 15, codes.codes >> 4], dim=-1).reshape(n, -1).to(torch.int32)
    scale = codes.scales.float()
    if codes.zeros is None:
        q, zero = nibbles ^ 8, torch.zeros_like(scale)
    else:
        q, zero = nibbles, (8 - codes.zeros.float()) * scale
    group = codes.group
    k_pad = _multiple(codes.in_features, 1024)
    n_pad = _multiple(n, 8)
    q = F.pad(q, (0, k_pad - q.shape[1], 0, n_pad - n), value=8)
    groups = k_pad // group
    scale = F.pad(scale, (0, groups - scale.shape[1], 0, n_pad - n), value=1.0)
    zero = F.pad(zero, (0, groups - zero.shape[1], 0, n_pad - n), value=0.0)
    return q, scale, zero


def _multiple(value: int, of: int) -> int:
    return int(math.ceil(value / of) * of)


def torchao_int4(codes: StoredCodes) -> torch.Tensor:
    """torchao's tinygemm int4 weight (CUDA, compute capability 8.0+) holding exactly these codes; the scales and
    zero points become bfloat16, as tinygemm keeps them."""
    from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import Int4TilePackedTo4dTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    q, scale, zero = tinygemm_qparams(codes)
    # torchao's own packing (Int4TilePackedTo4dTensor.from_hp): even column in the high nibble, 8 inner k-tiles.
    packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous(), 8)
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale.to(torch.bfloat16), zero.to(torch.bfloat16), torch.bfloat16)
    shape = torch.Size([codes.codes.shape[0], codes.in_features])
    return Int4TilePackedTo4dTensor(packed, scale_and_zero, [1, codes.group], shape)


def torchao_int8(codes: StoredCodes, dtype: torch.dtype) -> torch.Tensor:
    """torchao's per-row ``Int8Tensor`` holding exactly these codes (its linear: ``x @ codes.T * scale``)."""
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    return Int8Tensor(codes.codes, codes.scales.float(), [1, codes.in_features], dtype)


def weight_only_converter(codes: StoredCodes, dtype: torch.dtype) -> torch.Tensor | str:
    """The torchao tensor for these codes on this GPU, or why there is none."""
    if codes.bits == 8:
        if codes.scales.shape[1] != 1 or codes.codes.shape[1] != codes.in_features:
            return "grouped int8: torchao dequantizes it whole on each call, no faster than the graph's decode"
        return torchao_int8(codes, dtype)
    if codes.group not in TINYGEMM_GROUPS:
        return f"int4 group {codes.group}: tinygemm takes groups of {', '.join(map(str, TINYGEMM_GROUPS))}"
    if torch.cuda.get_device_capability(codes.codes.device) < (8, 0):
        return "tinygemm needs compute capability 8.0+"
    return torchao_int4(codes)


def use_weight_only(
    gm: torch.fx.GraphModule,
    convert: Callable[[StoredCodes, torch.dtype], torch.Tensor | str],
    report: KernelReport,
) -> None:
    """Replace each Linear's in-graph decode of stored codes by one ``convert``-ed weight tensor (in place)."""
    graph = gm.graph
    for i, linear in enumerate([n for n in graph.nodes if _is_linear(n)]):
        weight = linear.args[1] if len(linear.args) > 1 else None
        if not isinstance(weight, torch.fx.Node) or weight.op != "call_function":
            continue
        cone = _ancestors(weight)
        if any(n.op not in ("get_attr", "call_function") for n in cone):
            continue  # computed from an input: an activation, not a stored weight
        parts = [_attr(gm, str(n.target)) for n in cone if n.op == "get_attr"]
        if not any(isinstance(t, torch.Tensor) and t.dtype in (torch.int8, torch.uint8) for t in parts):
            continue
        name = _layer_name(linear)
        decoded = _evaluate(gm, weight, cone)
        codes = stored_codes([t for t in parts if isinstance(t, torch.Tensor)], decoded.shape[-1])
        if codes is None or decoded.dim() != 2:
            report.skip(name, "its weight is decoded from integers in a way Squeeze did not write")
            continue
        if not torch.allclose(decode(codes), decoded.float(), rtol=1e-2, atol=1e-6):
            report.skip(name, "the stored codes do not reproduce the graph's decoded weight")
            continue
        try:
            converted = convert(codes, decoded.dtype)
        except Exception as exc:  # the kernels' own limits, in their words
            report.skip(name, f"{type(exc).__name__}: {exc}"[:300])
            continue
        if isinstance(converted, str):
            report.skip(name, converted)
            continue
        attr = f"_squeeze_kernel_weight_{i}"
        gm.register_buffer(attr, converted, persistent=False)
        with graph.inserting_before(linear):
            fresh = graph.get_attr(attr)
        # F.linear, not aten.linear: torchao tensors take over linear in __torch_function__, before aten
        # decomposes it.
        linear.target = F.linear
        linear.args = (linear.args[0], fresh, *linear.args[2:])
        (report.int4 if codes.bits == 4 else report.int8).append(name)
    _drop_dead_decodes(gm)


def _drop_dead_decodes(gm: torch.fx.GraphModule) -> None:
    """Remove decodes nothing reads any more, with the metadata asserts export left on their inputs."""
    graph = gm.graph
    assert_op = torch.ops.aten._assert_tensor_metadata.default
    changed = True
    while changed:  # an assert keeps its input alive; dropping it can free the decode step before it
        changed = graph.eliminate_dead_code()
        for node in list(graph.nodes):
            source = node.args[0] if node.target is assert_op and node.args else None
            if isinstance(source, torch.fx.Node) and all(u.target is assert_op for u in source.users):
                graph.erase_node(node)
                changed = True
    graph.lint()
    gm.recompile()


# ----------------------------------------------------------------------------------------------------
# The runner's entry point


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x = torch.cat([t.detach().float().flatten() for t in a])
    y = torch.cat([t.detach().float().flatten() for t in b])
    if not bool(torch.isfinite(y).all()):
        return float("nan")
    denom = float(x.norm() * y.norm())
    return float((x @ y) / denom) if denom > 0 else (1.0 if bool(torch.equal(x, y)) else 0.0)


def with_cuda_kernels(
    build: Callable[[], torch.fx.GraphModule],
    probe: Callable[[torch.nn.Module], list[torch.Tensor]],
    *,
    semi_structured: tuple[str, Converter] | None = None,
    weight_only: Callable[[StoredCodes, torch.dtype], torch.Tensor | str] | None = None,
) -> tuple[torch.fx.GraphModule, KernelReport]:
    """A module from ``build()`` with the kernel swaps applied, if it passes the probe; else a dense one.

    ``probe(module)`` runs a module on fixed inputs and returns its output tensors. The defaults are the CUDA
    converters; tests pass stand-ins.
    """
    report = KernelReport()
    dense = build()
    fast = build()  # shares the dense module's tensors: a swap rebinds attributes of this one only
    if semi_structured is None and weight_only is None:
        if torch.cuda.get_device_capability() < (8, 0):
            report.fallback = "no kernel swap: 2:4 and tinygemm kernels need compute capability 8.0+"
            return dense, report
        semi_structured = semi_structured_converter()
        weight_only = weight_only_converter
    try:
        with torch.no_grad():
            if semi_structured is not None:
                report.backend = semi_structured[0]
                use_semi_structured(fast, semi_structured[1], report)
            if weight_only is not None:
                use_weight_only(fast, weight_only, report)
        if not (report.semi_structured or report.int8 or report.int4):
            return dense, report
        with torch.inference_mode():
            expected, got = probe(dense), probe(fast)
        report.check_cosine = _cosine(expected, got)
    except Exception as exc:  # a kernel that refuses these shapes at run time: measure the dense module instead
        report.fallback = f"kernels failed on a probe batch: {type(exc).__name__}: {exc}"[:400]
        return dense, report
    if not report.check_cosine >= MIN_COSINE:  # also catches NaN
        report.fallback = f"kernels' outputs differ from the dense module's (cosine {report.check_cosine:.4f})"
        return dense, report
    return fast, report
