"""The ONNX catalogue beyond magnitude pruning and ORT's int8: structured pruning that removes channels, and
weight-only int8/int4 stored packed (MatMulNBits, GatherBlockQuantized).

Models are the trained digits CNN and small graphs built here with known weights; MiniLM (real, offline) is marked
slow. Every result is also loaded with a bare ``onnxruntime.InferenceSession``, as a user would.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.jobs.spec import (
    EvalOptions,
    PruneMagnitude,
    PruneStructured,
    PruneWanda,
    QuantizeInt4WeightOnly,
    QuantizeInt8WeightOnly,
    Step,
)
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.onnx_graphs import branchy_cnn, mlp_model, save_graph, text_model
from worker.compress.onnx_format import OnnxBackend
from worker.compress.pipeline import run_pipeline
from worker.compress.pruning import channel_keep, output_axis
from worker.compress.types import CompressionError, EvalData, PipelineResult, StepContext

FAST = EvalOptions(batch_size=64, latency_runs=5, warmup_runs=1, layer_sensitivity="off")


@pytest.fixture(scope="module")
def backend() -> OnnxBackend:
    return OnnxBackend()


@pytest.fixture(scope="module")
def digits_data() -> EvalData:
    arrays = np.load(io.BytesIO(digits_npz_bytes()))
    return EvalData({"input": arrays["input"]}, arrays["labels"])


@pytest.fixture
def digits_model(tmp_path: Path) -> Path:
    path = tmp_path / "digits.onnx"
    path.write_bytes(digits_onnx_bytes())
    return path


def ctx(tmp_path: Path, original: Path) -> StepContext:
    return StepContext(data=None, device="cpu", original=original, original_format="onnx", workdir=tmp_path)


def pipeline(model: Path, step: Step, data: EvalData, workdir: Path, options: EvalOptions = FAST) -> PipelineResult:
    return run_pipeline(
        model_path=model, fmt="onnx", steps=[step], data=data, options=options, device="cpu", workdir=workdir
    )


def plain_run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def zero_channels(src: Path, dst: Path, layers: dict[str, int]) -> None:
    """The reference for structured pruning: each named layer's lowest-L1 output channels zeroed, biases kept.

    Removing such a channel and folding its constant output into the next layer's bias must compute the same.
    """
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    for name, keep in layers.items():
        w = numpy_helper.to_array(inits[name]).copy()
        scores = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
        w[np.argsort(-scores, kind="stable")[keep:]] = 0.0
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    onnx.save(model, str(dst))


# -- structured ---------------------------------------------------------------------------------------------


def test_structured_halves_digits_channels_and_the_file(
    backend: OnnxBackend, digits_model: Path, digits_data: EvalData, tmp_path: Path
):
    result = pipeline(digits_model, PruneStructured(method="structured", sparsity=0.5), digits_data, tmp_path)
    base, res = result.baseline, result.result
    assert res is not None and result.output_path is not None
    details = result.steps[0].details
    channels = {row["name"]: (row["channels_before"], row["channels_after"]) for row in details["layers"]}
    assert channels == {"0.weight": (16, 8), "2.weight": (32, 16), "6.weight": (64, 32)}
    assert details["skipped"] == [
        {"name": "8.weight", "op": "Gemm", "channels_before": 10, "reason": "its channels reach a graph output"}
    ]
    # Physically smaller: a quarter of the parameters, the file shrinks with them, nothing is stored as zeros.
    assert res.parameters == res.nonzero_parameters < base.parameters / 3.5
    assert res.size_bytes < base.size_bytes / 3.5
    assert not any("densely" in n for n in result.notes)
    shapes = {row["name"]: row["shape"] for row in res.layers or []}
    assert shapes["0.weight"] == [8, 1, 3, 3] and shapes["2.weight"] == [16, 8, 3, 3]
    assert shapes["6.weight"] == [32, 16 * 4 * 4] and shapes["8.weight"] == [10, 32]
    # The artifact runs in plain onnxruntime, any batch size, with the accuracy the report gives.
    logits = plain_run(result.output_path, {"input": digits_data.inputs["input"]})
    assert logits.shape == (digits_data.num_samples, 10)
    assert float((logits.argmax(1) == digits_data.labels).mean()) == pytest.approx(res.accuracy, abs=1e-9)
    assert res.accuracy is not None and res.accuracy > 0.5  # no fine-tuning for ONNX (measured 0.685)


def test_structured_removal_equals_zeroed_channels_with_biases_folded(backend: OnnxBackend, tmp_path: Path):
    """Through BatchNormalization, SiLU, Concat, a per-channel Mul, MaxPool and a flattening Reshape the pruned
    graph computes exactly what the original computes with those channels' weights zeroed (their biases kept),
    because each removed channel's constant output is folded into its consumer's bias."""
    src = branchy_cnn(tmp_path / "branchy.onnx")
    dst = tmp_path / "pruned.onnx"
    report = backend.prune_structured(src, dst, PruneStructured(method="structured", sparsity=0.5), ctx(tmp_path, src))
    after = {row["name"]: row["channels_after"] for row in report.details["layers"]}
    assert after == {"a.weight": 4, "b.weight": 3, "fc1.weight": 8}
    reasons = {row["name"]: row["reason"] for row in report.details["skipped"]}
    assert set(reasons) == {"c.weight", "d.weight", "fc2.weight"}
    assert "computed tensor" in reasons["c.weight"] and "graph output" in reasons["fc2.weight"]

    reference = tmp_path / "zeroed.onnx"
    zero_channels(src, reference, after)
    x = np.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(plain_run(dst, {"x": x}), plain_run(reference, {"x": x}), rtol=1e-4, atol=1e-4)
    assert (plain_run(dst, {"x": x}) != plain_run(src, {"x": x})).any()
    pruned = {t.name: list(t.dims) for t in onnx.load(str(dst)).graph.initializer}
    assert pruned["c.weight"] == [10, 7, 1, 1] and pruned["fc1.weight"] == [8, 160] and pruned["fc2.weight"] == [5, 8]


def test_structured_round_to_overrides_and_l2(backend: OnnxBackend, digits_model: Path, tmp_path: Path):
    step = PruneStructured(method="structured", sparsity=0.3, norm="l2", round_to=8, overrides={"0.weight": 0.0})
    report = backend.prune_structured(digits_model, tmp_path / "out.onnx", step, ctx(tmp_path, digits_model))
    after = {row["name"]: row["channels_after"] for row in report.details["layers"]}
    # 0.weight left whole; 32 * 0.7 = 22.4 -> 24 (a multiple of 8); 64 * 0.7 = 44.8 -> 48.
    assert after == {"0.weight": 16, "2.weight": 24, "6.weight": 48}
    assert report.details["layers_pruned"] == 2 and report.details["norm"] == "l2"


def test_structured_on_a_graph_with_nothing_it_can_resize_fails_clearly(backend: OnnxBackend, tmp_path: Path):
    rng = np.random.default_rng(0)
    src = save_graph(
        tmp_path / "single.onnx",
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        {"w": rng.standard_normal((3, 4)).astype(np.float32)},
    )
    with pytest.raises(CompressionError) as err:
        backend.prune_structured(
            src, tmp_path / "out.onnx", PruneStructured(method="structured", sparsity=0.5), ctx(tmp_path, src)
        )
    assert err.value.code == "nothing_to_prune" and "graph output" in err.value.message


def test_channel_keep_counts_and_output_axes():
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.5])
    assert channel_keep(scores, 0.5).tolist() == [True, False, True, False, True, False]
    assert channel_keep(scores, 0.0, round_to=4).all()  # sparsity 0 never prunes, whatever round_to says
    assert channel_keep(scores, 0.5, round_to=4).sum() == 4 and channel_keep(scores, 0.99).sum() == 1
    assert output_axis(4, 1) == 0  # Conv (O, I, kh, kw)
    assert output_axis(2, 1) == 0 and output_axis(2, 0) == 1 and output_axis(2, -2) == 1  # Gemm transB / MatMul
    assert output_axis(3, -2) == 2  # batched MatMul weight (1, K, N)


# -- wanda ------------------------------------------------------------------------------------------------------


def test_wanda_keeps_the_weights_that_large_inputs_multiply(backend: OnnxBackend, tmp_path: Path):
    """Inputs whose features differ in scale by 1000x: Wanda (|W| x input norm) keeps the weights that matter for
    the outputs, magnitude keeps the large ones; both zero exactly half of every output neuron's weights."""
    src = mlp_model(tmp_path / "mlp.onnx", widths=(64, 32, 8))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 64)) * np.logspace(-2, 1, 64)[rng.permutation(64)]).astype(np.float32)
    data = EvalData({"x": x})
    step = PruneWanda(method="wanda", sparsity=0.5, calibration_samples=128)
    wanda, magnitude = tmp_path / "wanda.onnx", tmp_path / "magnitude.onnx"
    context = StepContext(data=data, device="cpu", original=src, original_format="onnx", workdir=tmp_path)
    report = backend.prune_wanda(src, wanda, step, context)
    assert report.details["calibration_samples"] == 128 and report.details["achieved_sparsity"] == 0.5
    backend.prune_magnitude(src, magnitude, PruneMagnitude(method="magnitude", sparsity=0.5, scope="per_layer"))
    for w in (t for t in onnx.load(str(wanda)).graph.initializer if t.name.endswith(".weight")):
        rows = numpy_helper.to_array(w)  # Gemm transB: one output neuron per row
        assert ((rows == 0).sum(axis=1) == rows.shape[1] // 2).all()
    held_out = {"x": x[128:]}
    reference = plain_run(src, held_out)
    lost_wanda = 1 - cosine(reference, plain_run(wanda, held_out))
    lost_magnitude = 1 - cosine(reference, plain_run(magnitude, held_out))
    assert lost_wanda < 0.75 * lost_magnitude  # measured: 0.062 vs 0.097


def test_wanda_n_m_and_needs_data(backend: OnnxBackend, tmp_path: Path):
    src = mlp_model(tmp_path / "mlp.onnx", widths=(64, 32, 8))
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    context = StepContext(data=EvalData({"x": x}), device="cpu", original=src, original_format="onnx", workdir=tmp_path)
    dst = tmp_path / "24.onnx"
    backend.prune_wanda(src, dst, PruneWanda(method="wanda", pattern="2:4"), context)
    for w in (t for t in onnx.load(str(dst)).graph.initializer if t.name.endswith(".weight")):
        groups = numpy_helper.to_array(w).reshape(w.dims[0], -1, 4)  # groups of 4 along K (transB: the last axis)
        assert ((groups != 0).sum(axis=2) <= 2).all()
    with pytest.raises(CompressionError) as err:
        backend.prune_wanda(src, dst, PruneWanda(method="wanda", sparsity=0.5), ctx(tmp_path, src))
    assert err.value.code == "dataset_required"


# -- weight-only ----------------------------------------------------------------------------------------------


def test_int4_weight_only_stores_an_mlp_packed_in_four_bits(backend: OnnxBackend, tmp_path: Path):
    src = mlp_model(tmp_path / "mlp.onnx")
    dst = tmp_path / "int4.onnx"
    step = QuantizeInt4WeightOnly(method="int4_weight_only", group_size=32)
    report = backend.quantize_int4_weight_only(src, dst, step, ctx(tmp_path, src))
    assert report.details["gemm_rewritten_as_matmul"] == 3 and len(report.details["layers"]) == 3
    # Weights dominate: 4 bits plus one float scale per 32 weights is 5 bits, so ~6.4x on the whole file.
    assert backend.stored_size(src) / backend.stored_size(dst) > 5.5
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops
    # Same logical parameters, now 4-bit; each layer keeps its name.
    assert backend.count_parameters(dst)[0] == backend.count_parameters(src)[0]
    rows = {r["name"]: r for r in backend.layers(dst)}
    assert rows["fc1.weight"]["shape"] == [512, 512] and rows["fc1.weight"]["bits"] == 4
    assert rows["fc1.weight"]["bytes"] == 512 * 512 // 2
    x = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
    assert cosine(plain_run(src, {"x": x}), plain_run(dst, {"x": x})) > 0.99


def test_int8_weight_only_on_digits_keeps_accuracy(
    backend: OnnxBackend, digits_model: Path, digits_data: EvalData, tmp_path: Path
):
    result = pipeline(digits_model, QuantizeInt8WeightOnly(method="int8_weight_only"), digits_data, tmp_path)
    base, res = result.baseline, result.result
    assert res is not None and res.accuracy is not None and base.accuracy is not None
    assert res.accuracy >= base.accuracy - 0.005 and res.cosine is not None and res.cosine > 0.999
    assert res.size_bytes < base.size_bytes * 0.4  # the Gemms are 90% of the bytes; the Convs stay float
    assert any("Conv layer(s) left in float" in n for n in result.notes)
    layers = {row["name"]: row for row in result.steps[0].details["layers"]}
    assert layers["6.weight"]["block_size"] == 256 and layers["8.weight"]["block_size"] == 64  # K 512 and 64


def test_embedding_tables_are_packed_only_when_asked(backend: OnnxBackend, tmp_path: Path):
    src = text_model(tmp_path / "text.onnx")
    ids = {"input_ids": np.random.default_rng(0).integers(0, 2000, (4, 12)).astype(np.int64)}
    reference = plain_run(src, ids)

    plain = tmp_path / "plain.onnx"
    report = backend.quantize_int8_weight_only(
        src, plain, QuantizeInt8WeightOnly(method="int8_weight_only"), ctx(tmp_path, src)
    )
    assert report.details["embeddings"] == [] and any("include" in n for n in report.notes)
    assert backend.stored_size(src) / backend.stored_size(plain) < 1.3  # the table is most of the bytes

    for bits, step, ratio, fidelity in [
        # int8: a byte per weight and a float scale per 64-wide row or block, 1.06 bytes: 3.76x at best.
        (8, QuantizeInt8WeightOnly(method="int8_weight_only", include=["embedding"]), 3.6, 0.999),
        (4, QuantizeInt4WeightOnly(method="int4_weight_only", include=["embedding"], symmetric=False), 5.5, 0.98),
    ]:
        dst = tmp_path / f"int{bits}.onnx"
        getattr(backend, f"quantize_{step.method}")(src, dst, step, ctx(tmp_path, src))
        nodes = [n.op_type for n in onnx.load(str(dst)).graph.node]
        assert nodes.count("GatherBlockQuantized") == 1 and nodes.count("MatMulNBits") == 2
        assert backend.stored_size(src) / backend.stored_size(dst) > ratio
        assert cosine(reference, plain_run(dst, ids)) > fidelity
        rows = {r["name"]: r for r in backend.layers(dst)}
        assert rows["embedding"]["shape"] == [2000, 64] and rows["embedding"]["bits"] == bits
        assert backend.count_parameters(dst)[0] == backend.count_parameters(src)[0]


def test_pruned_zeros_stay_countable_after_int4_packing(backend: OnnxBackend, tmp_path: Path):
    src = mlp_model(tmp_path / "mlp.onnx")
    pruned, packed = tmp_path / "pruned.onnx", tmp_path / "packed.onnx"
    backend.prune_magnitude(src, pruned, PruneMagnitude(method="magnitude", sparsity=0.5, scope="per_layer"))
    step = QuantizeInt4WeightOnly(method="int4_weight_only", group_size=64)
    backend.quantize_int4_weight_only(pruned, packed, step, ctx(tmp_path, src))
    total, nonzero = backend.count_parameters(packed)
    pruned_total, pruned_nonzero = backend.count_parameters(pruned)
    assert total == pruned_total
    # Every pruned zero is stored as the zero code; rounding adds a few more zeros, never fewer.
    assert pruned_nonzero * 0.9 < nonzero <= pruned_nonzero


def test_weight_only_refuses_blocks_matmulnbits_cannot_pack(backend: OnnxBackend, digits_model: Path, tmp_path: Path):
    for step in (
        QuantizeInt4WeightOnly(method="int4_weight_only", group_size=512),
        QuantizeInt8WeightOnly(method="int8_weight_only", group_size=48),
    ):
        with pytest.raises(CompressionError) as err:
            getattr(backend, f"quantize_{step.method}")(
                digits_model, tmp_path / "x.onnx", step, ctx(tmp_path, digits_model)
            )
        assert err.value.code == "unsupported_option" and "power of two" in err.value.message


@pytest.mark.slow
def test_minilm_int8_weight_only_with_embeddings(backend: OnnxBackend, tmp_path: Path):
    from tests.support.minilm import minilm_arrays, minilm_onnx_path

    src = minilm_onnx_path()
    step = QuantizeInt8WeightOnly(method="int8_weight_only", include=["embedding"])
    options = EvalOptions(batch_size=32, latency_runs=3, warmup_runs=1, layer_sensitivity="off")
    result = pipeline(src, step, EvalData(minilm_arrays()), tmp_path, options)
    base, res = result.baseline, result.result
    assert res is not None and res.cosine is not None
    ratio = base.size_bytes / res.size_bytes
    print(f"\nMiniLM int8_weight_only + embedding: {ratio:.3f}x smaller, cosine {res.cosine:.5f}")
    # 3.87x measured: 0.37 MB of the 23.5 MB are the exporter's per-node debug metadata (stack traces), kept.
    assert ratio > 3.8 and res.cosine > 0.999
    assert res.parameters == base.parameters
