"""The CUDA kernel swaps of a measured .pt2 (worker/compress/pt2_kernels.py), as far as a CPU can check them.

The swaps' graph surgery is device-agnostic and runs here with stand-in converters (2:4: a dense copy) or with the
real converter where torchao has a CPU path (per-row int8). What only a GPU can run (cuSPARSELt/CUTLASS 2:4,
tinygemm int4 packing) is covered by `bash bench/gpu_check.sh` on a GPU machine, not here. The int4 codes' tinygemm
parameters are checked against torch's own decode of the stored codes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.jobs.spec import PruneMagnitude, QuantizeFp16, QuantizeInt4WeightOnly, QuantizeInt8WeightOnly
from worker.compress import pt2_kernels
from worker.compress.backend import get_backend
from worker.compress.types import StepContext


@pytest.fixture(scope="module")
def backend():
    return get_backend("pt2")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    ).eval()
    path = tmp_path_factory.mktemp("kernels") / "mlp.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (torch.zeros(4, 256),), dynamic_shapes=({0: batch},)), str(path))
    return path


def _ctx(src: Path) -> StepContext:
    return StepContext(data=None, device="cpu", original=src, original_format="pt2", workdir=src.parent)


def _probe(x: torch.Tensor):
    return lambda module: [module(x)]


X = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))


def _load_module(path: Path):
    return torch.export.load(str(path)).module


def test_two_four_weights_in_half_precision_are_swapped_and_others_are_explained(backend, mlp: Path) -> None:
    pruned, half = mlp.parent / "p24.pt2", mlp.parent / "p24-fp16.pt2"
    backend.prune_magnitude(mlp, pruned, PruneMagnitude(method="magnitude", pattern="2:4"))
    backend.quantize(pruned, half, QuantizeFp16(method="fp16"), None, "cpu")
    converted: list[tuple[int, ...]] = []

    def stand_in(w: torch.Tensor) -> torch.Tensor:  # the real converters need CUDA
        assert pt2_kernels.is_two_four(w) and w.dtype == torch.float16 and w.is_contiguous()
        converted.append(tuple(w.shape))
        return w.clone()

    module, report = pt2_kernels.with_cuda_kernels(
        _load_module(half), _probe(X), semi_structured=("stand-in", stand_in)
    )
    assert sorted(converted) == [(8, 64), (64, 128), (128, 256)]
    assert report.used and report.check_cosine == pytest.approx(1.0) and report.fallback is None
    assert report.as_dict()["semi_structured_2_4"] == 3 and "2:4 sparse kernels (stand-in) on 3" in report.describe()
    assert torch.equal(module(X), _load_module(half)()(X))

    # fp32 2:4 weights are named with what to add; an unpruned model has nothing to report.
    _, fp32 = pt2_kernels.with_cuda_kernels(_load_module(pruned), _probe(X), semi_structured=("stand-in", stand_in))
    assert not fp32.used and all("add quantize/fp16" in why for why in fp32.skipped.values())
    assert len(fp32.skipped) == 3
    _, dense = pt2_kernels.with_cuda_kernels(_load_module(mlp), _probe(X), semi_structured=("stand-in", stand_in))
    assert not dense.used and dense.skipped == {}


def test_a_swap_that_changes_the_outputs_falls_back_to_the_dense_module(backend, mlp: Path) -> None:
    pruned, half = mlp.parent / "q24.pt2", mlp.parent / "q24-fp16.pt2"
    backend.prune_magnitude(mlp, pruned, PruneMagnitude(method="magnitude", pattern="2:4"))
    backend.quantize(pruned, half, QuantizeFp16(method="fp16"), None, "cpu")
    module, report = pt2_kernels.with_cuda_kernels(
        _load_module(half), _probe(X), semi_structured=("broken", lambda w: torch.flip(w, dims=[1]).contiguous())
    )
    assert not report.used and "differ from the dense module" in (report.fallback or "")
    assert torch.equal(module(X), _load_module(half)()(X))  # the dense module is what gets measured

    def refusing(w: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("Error original_tensor.shape is not supported")

    _, refused = pt2_kernels.with_cuda_kernels(_load_module(half), _probe(X), semi_structured=("x", refusing))
    assert not refused.used and all("not supported" in why for why in refused.skipped.values())


def test_int8_codes_run_on_torchaos_int8_tensor_with_the_graphs_results(backend, mlp: Path) -> None:
    dst = mlp.parent / "int8.pt2"
    backend.quantize_int8_weight_only(mlp, dst, QuantizeInt8WeightOnly(method="int8_weight_only"), _ctx(mlp))
    module, report = pt2_kernels.with_cuda_kernels(
        _load_module(dst), _probe(X), weight_only=pt2_kernels.weight_only_converter
    )
    assert report.used and len(report.int8) == 3 and report.int4 == []
    kinds = {type(getattr(module, n)).__name__ for n in dir(module) if n.startswith("_squeeze_kernel_weight_")}
    assert kinds == {"Int8Tensor"}
    graph_ops = {str(n.target) for n in module.graph.nodes if n.op == "call_function"}
    assert not any("rshift" in op or "mul" in op for op in graph_ops)  # the per-call decode is gone
    np.testing.assert_allclose(
        module(X).detach().numpy(), _load_module(dst)()(X).detach().numpy(), rtol=1e-4, atol=1e-5
    )

    grouped = mlp.parent / "int8-g32.pt2"
    backend.quantize_int8_weight_only(
        mlp, grouped, QuantizeInt8WeightOnly(method="int8_weight_only", group_size=32), _ctx(mlp)
    )
    _, kept = pt2_kernels.with_cuda_kernels(
        _load_module(grouped), _probe(X), weight_only=pt2_kernels.weight_only_converter
    )
    assert not kept.used and all(why.startswith("grouped int8") for why in kept.skipped.values())


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_codes_map_exactly_onto_tinygemms_parameters(backend, mlp: Path, symmetric: bool) -> None:
    dst = mlp.parent / f"int4-{symmetric}.pt2"
    step = QuantizeInt4WeightOnly(method="int4_weight_only", group_size=32, symmetric=symmetric)
    backend.quantize_int4_weight_only(mlp, dst, step, _ctx(mlp))
    seen: list[pt2_kernels.StoredCodes] = []

    def tinygemm_on_cpu(codes: pt2_kernels.StoredCodes, dtype: torch.dtype) -> torch.Tensor:
        # What tinygemm computes from these parameters: (q - 8) * scale + zero, per group (torchao's reference).
        q, scale, zero = pt2_kernels.tinygemm_qparams(codes)
        assert q.shape[0] % 8 == 0 and q.shape[1] % 1024 == 0 and int(q.min()) >= 0 and int(q.max()) <= 15
        w = (q.float() - 8) * scale.repeat_interleave(codes.group, 1) + zero.repeat_interleave(codes.group, 1)
        seen.append(codes)
        return w[: codes.codes.shape[0], : codes.in_features].to(dtype)

    module, report = pt2_kernels.with_cuda_kernels(_load_module(dst), _probe(X), weight_only=tinygemm_on_cpu)
    assert report.used and len(report.int4) == 3 and all(c.group == 32 for c in seen)
    assert (seen[0].zeros is None) == symmetric
    np.testing.assert_allclose(
        module(X).detach().numpy(), _load_module(dst)()(X).detach().numpy(), rtol=1e-5, atol=1e-5
    )


def test_a_cpu_runner_never_touches_the_kernel_swap(backend, mlp: Path) -> None:
    runner = backend.open_kernel_runner(mlp, "cpu")
    assert runner.kernels is None and runner.runtime == backend.open_runner(mlp, "cpu").runtime
    assert pt2_kernels.is_two_four(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 3]]))
    assert not pt2_kernels.is_two_four(torch.tensor([[1.0, 1, 0, 2]]))
