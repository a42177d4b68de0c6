"""The ONNX backend on real models: a digits CNN (trained in the test support) and, marked slow, MiniLM-L6.

Every accuracy here is measured on held-out digits; "plain onnxruntime" means a bare ``InferenceSession`` that
shares no code with the backend, so a saved artifact is checked the way a user would load it.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.jobs.spec import (
    EvalOptions,
    PruneMagnitude,
    QuantizeFp16,
    QuantizeInt8Dynamic,
    QuantizeInt8Static,
)
from tests.support.models import build_digits_cnn, digits_npz_bytes, digits_onnx_bytes
from worker.compress.onnx_format import OnnxBackend
from worker.compress.pipeline import run_pipeline
from worker.compress.types import CompressionError, EvalData

FAST = EvalOptions(batch_size=64, latency_runs=5, warmup_runs=1)


@pytest.fixture(scope="module")
def backend() -> OnnxBackend:
    return OnnxBackend()


@pytest.fixture
def digits_model(tmp_path: Path) -> Path:
    path = tmp_path / "model" / "digits.onnx"
    path.parent.mkdir()
    path.write_bytes(digits_onnx_bytes())
    return path


@pytest.fixture(scope="module")
def digits_data() -> EvalData:
    arrays = np.load(io.BytesIO(digits_npz_bytes()))
    return EvalData({"input": arrays["input"]}, arrays["labels"])


def plain_ort_logits(path: Path, data: EvalData) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": data.inputs["input"]})[0]


def plain_ort_outputs(path: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, arrays)[0].astype(np.float64)


def plain_ort_accuracy(path: Path, data: EvalData) -> float:
    return float((plain_ort_logits(path, data).argmax(axis=1) == data.labels).mean())


@pytest.fixture(scope="module")
def baseline_accuracy(tmp_path_factory: pytest.TempPathFactory, digits_data: EvalData) -> float:
    path = tmp_path_factory.mktemp("baseline") / "digits.onnx"
    path.write_bytes(digits_onnx_bytes())
    return plain_ort_accuracy(path, digits_data)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def tiny_text_model(path: Path) -> None:
    """ids -> embedding Gather -> MatMul + bias -> LayerNorm: one prunable weight among four parameters."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "embedding"),
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "dense.weight"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "dense.bias"),
        numpy_helper.from_array(np.ones(4, np.float32), "norm.scale"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["h0"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["h0", "m3"], ["h1"]),
        helper.make_node("MatMul", ["h1", "dense.weight"], ["h2"]),
        helper.make_node("Add", ["h2", "dense.bias"], ["h3"]),
        helper.make_node("LayerNormalization", ["h3", "norm.scale"], ["out"], axis=-1),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    graph = helper.make_graph(
        nodes,
        "tiny_text",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


# -- runner, sizes, parameters ----------------------------------------------------------------------------------


def test_runner_runs_digits_and_casts_inputs(backend: OnnxBackend, digits_model: Path, digits_data: EvalData):
    runner = backend.open_runner(digits_model, "cpu")
    assert runner.runtime == f"onnxruntime {ort.__version__} CPUExecutionProvider"
    assert runner.device == "cpu"
    assert runner.fixed_batch is None  # exported with a dynamic batch dimension
    x = digits_data.inputs["input"][:5]
    expected = plain_ort_logits(digits_model, EvalData({"input": x}))
    (logits,) = runner({"input": x.astype(np.float64)})  # float64 data is cast to the model's float32
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(CompressionError) as err:
        runner({"pixels": x})
    assert err.value.code == "input_mismatch"
    assert "input" in err.value.message


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_cuda_without_cuda_provider_is_refused_not_silently_cpu(backend: OnnxBackend, digits_model: Path):
    with pytest.raises(CompressionError) as err:
        backend.open_runner(digits_model, "cuda")
    assert err.value.code == "device_unavailable"


def test_parameters_match_the_network_and_size_counts_external_data(backend: OnnxBackend, digits_model: Path):
    expected = sum(p.numel() for p in build_digits_cnn().parameters())
    assert backend.count_parameters(digits_model) == (expected, expected)
    assert backend.stored_size(digits_model) == digits_model.stat().st_size

    external = digits_model.parent / "external.onnx"
    model = onnx.load(str(digits_model))
    onnx.save_model(model, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    weights = digits_model.parent / "weights.bin"
    assert backend.stored_size(external) == external.stat().st_size + weights.stat().st_size
    assert backend.count_parameters(external) == (expected, expected)


def test_external_data_outside_the_model_folder_is_refused(backend: OnnxBackend, tmp_path: Path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    folder = tmp_path / "upload"
    folder.mkdir()
    model = onnx.load_from_string(digits_onnx_bytes())
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../secret.bin")
    path = folder / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    for call in (backend.stored_size, backend.count_parameters, lambda p: backend.open_runner(p, "cpu")):
        with pytest.raises(CompressionError) as err:
            call(path)
        assert err.value.code == "invalid_model"
        assert "outside" in err.value.message


def test_unreadable_and_unrunnable_models_are_invalid_model(backend: OnnxBackend, tmp_path: Path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    custom = tmp_path / "custom_op.onnx"
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(custom))
    for path in (garbage, custom):
        with pytest.raises(CompressionError) as err:
            backend.open_runner(path, "cpu")
        assert err.value.code == "invalid_model"
    with pytest.raises(CompressionError) as err:
        backend.quantize(garbage, tmp_path / "out.onnx", QuantizeFp16(method="fp16"), None, "cpu")
    assert err.value.code == "invalid_model"


def test_example_inputs_for_token_inputs_run_and_only_the_dense_weight_is_prunable(
    backend: OnnxBackend, tmp_path: Path
):
    path = tmp_path / "tiny.onnx"
    tiny_text_model(path)
    inputs = backend.example_inputs(path, batch_size=3)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].shape == (3, 16) and inputs["input_ids"].dtype == np.int64
    assert inputs["input_ids"].min() >= 0 and inputs["input_ids"].max() < 10  # inside the embedding table
    assert (inputs["attention_mask"] == 1).all()
    (out,) = backend.open_runner(path, "cpu")(inputs)
    assert out.shape == (3, 16, 4)

    report = backend.prune_magnitude(path, tmp_path / "pruned.onnx", PruneMagnitude(method="magnitude", sparsity=0.5))
    assert [layer["name"] for layer in report.details["layers"]] == ["dense.weight"]
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "pruned.onnx")).graph.initializer}
    assert (pruned["dense.weight"] == 0).sum() == 8
    assert np.count_nonzero(pruned["embedding"]) == 40 and np.count_nonzero(pruned["dense.bias"]) == 4


# -- pruning ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_global_pruning_hits_the_requested_sparsity(backend: OnnxBackend, digits_model: Path, sparsity: float):
    dst = digits_model.parent / "pruned.onnx"
    report = backend.prune_magnitude(digits_model, dst, PruneMagnitude(method="magnitude", sparsity=sparsity))
    details = report.details
    assert abs(details["achieved_sparsity"] - sparsity) < 1e-3
    assert details["requested_sparsity"] == sparsity
    assert details["layers_pruned"] == details["prunable_layers"] == 4  # 2 Conv + 2 Gemm weights, no biases
    # The artifact really holds the zeros, and plain onnx sees them.
    zeros = sum(
        int((numpy_helper.to_array(t) == 0).sum())
        for t in onnx.load(str(dst)).graph.initializer
        if t.name.endswith("weight")
    )
    assert abs(zeros / details["prunable_parameters"] - sparsity) < 1e-3
    total, nonzero = backend.count_parameters(dst)
    assert total == backend.count_parameters(digits_model)[0]
    assert abs((1 - nonzero / total) - sparsity * details["prunable_share"]) < 1e-3


def test_per_layer_pruning_prunes_each_layer_to_the_sparsity(backend: OnnxBackend, digits_model: Path):
    dst = digits_model.parent / "pruned.onnx"
    report = backend.prune_magnitude(
        digits_model, dst, PruneMagnitude(method="magnitude", sparsity=0.7, scope="per_layer")
    )
    for layer in report.details["layers"]:
        n = math.prod(layer["shape"])
        assert abs(layer["sparsity"] - 0.7) <= 1 / n, layer


def test_half_pruned_digits_keep_their_accuracy(
    backend: OnnxBackend, digits_model: Path, digits_data: EvalData, baseline_accuracy: float
):
    result = run_pipeline(
        model_path=digits_model,
        fmt="onnx",
        steps=[PruneMagnitude(method="magnitude", sparsity=0.5)],
        data=digits_data,
        options=FAST,
        device="cpu",
        workdir=digits_model.parent,
    )
    assert result.baseline.accuracy == pytest.approx(baseline_accuracy)
    assert result.result is not None and result.result.accuracy is not None
    print(f"\ndigits accuracy: baseline {baseline_accuracy:.4f}, 50% pruned {result.result.accuracy:.4f}")
    assert result.result.accuracy >= baseline_accuracy - 0.02
    assert result.output_path is not None
    assert plain_ort_accuracy(result.output_path, digits_data) == pytest.approx(result.result.accuracy)


# -- quantization -----------------------------------------------------------------------------------------------


def test_int8_dynamic_shrinks_digits_keeps_accuracy_and_loads_in_plain_onnxruntime(
    backend: OnnxBackend, digits_model: Path, digits_data: EvalData, baseline_accuracy: float
):
    workdir = digits_model.parent / "job"
    workdir.mkdir()
    result = run_pipeline(
        model_path=digits_model,
        fmt="onnx",
        steps=[QuantizeInt8Dynamic(method="int8_dynamic")],
        data=digits_data,
        options=FAST,
        device="cpu",
        workdir=workdir,
    )
    assert result.result is not None and result.output_path is not None
    ratio = result.result.size_bytes / result.baseline.size_bytes
    print(
        f"\nint8_dynamic digits: {result.baseline.size_bytes} -> {result.result.size_bytes} bytes "
        f"({ratio:.3f}x), accuracy {baseline_accuracy:.4f} -> {result.result.accuracy:.4f}"
    )
    # Linear weights to 1-byte ints; the two Conv layers stay float (ConvInteger is slow on CPU): measured 0.37
    assert ratio < 0.4
    assert result.result.accuracy is not None
    assert abs(result.result.accuracy - baseline_accuracy) <= 0.02
    assert result.result.parameters == result.baseline.parameters
    details = result.steps[0].details
    assert details["per_channel"] is True and details["quantized_weights"] == 2  # the two Linear layers
    assert result.steps[0].details["float_conv_layers"] == 2
    assert any("int8_static" in note for note in result.steps[0].notes)
    assert details["weight_bytes_after"] < details["weight_bytes_before"] / 2.5
    # The artifact stands alone: plain onnxruntime reproduces the accuracy the job reported.
    assert plain_ort_accuracy(result.output_path, digits_data) == pytest.approx(result.result.accuracy)
    assert {p.name for p in workdir.iterdir()} == {"result.onnx"}  # no scratch left behind


def test_int8_static_calibrates_on_data_and_keeps_accuracy(
    backend: OnnxBackend, digits_model: Path, digits_data: EvalData, baseline_accuracy: float
):
    dst = digits_model.parent / "static.onnx"
    step = QuantizeInt8Static(method="int8_static", calibration_samples=200)
    report = backend.quantize(digits_model, dst, step, digits_data, "cpu")
    assert report.details["calibration_samples"] == 200
    assert report.details["format"] == "QDQ"
    model = onnx.load(str(dst))
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    int8_weights = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8_weights) == 4
    accuracy = plain_ort_accuracy(dst, digits_data)
    print(f"\nint8_static digits: accuracy {baseline_accuracy:.4f} -> {accuracy:.4f}")
    assert abs(accuracy - baseline_accuracy) <= 0.02
    assert backend.count_parameters(dst)[0] == backend.count_parameters(digits_model)[0]


def test_int8_static_without_a_dataset_is_refused(backend: OnnxBackend, digits_model: Path):
    with pytest.raises(CompressionError) as err:
        backend.quantize(
            digits_model, digits_model.parent / "x.onnx", QuantizeInt8Static(method="int8_static"), None, "cpu"
        )
    assert err.value.code == "dataset_required"
    assert not (digits_model.parent / "x.onnx").exists()


def test_int8_static_on_a_fixed_batch_model_calibrates_in_its_batches(
    backend: OnnxBackend, digits_model: Path, digits_data: EvalData, baseline_accuracy: float
):
    model = onnx.load(str(digits_model))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 8
    fixed = digits_model.parent / "fixed8.onnx"
    onnx.save(model, str(fixed))
    assert backend.open_runner(fixed, "cpu").fixed_batch == 8

    result = run_pipeline(
        model_path=fixed,
        fmt="onnx",
        steps=[QuantizeInt8Static(method="int8_static", calibration_samples=20)],
        data=digits_data,  # 397 samples: the last batch of each pass is padded to 8
        options=FAST,
        device="cpu",
        workdir=digits_model.parent,
    )
    assert result.steps[0].details["calibration_batches"] == 3  # 20 samples in batches of 8
    assert result.baseline.accuracy == pytest.approx(baseline_accuracy)
    assert result.result is not None and result.result.accuracy is not None
    assert abs(result.result.accuracy - baseline_accuracy) <= 0.02
    assert result.result.latency_ms is not None and result.result.latency_ms["batch_size"] == 8


def test_fp16_halves_the_weights_and_keeps_float32_inputs(
    backend: OnnxBackend, digits_model: Path, digits_data: EvalData
):
    dst = digits_model.parent / "fp16.onnx"
    report = backend.quantize(digits_model, dst, QuantizeFp16(method="fp16"), None, "cpu")
    ratio = backend.stored_size(dst) / backend.stored_size(digits_model)
    print(f"\nfp16 digits: size ratio {ratio:.3f}")
    assert 0.45 < ratio < 0.55
    assert report.details["weight_bytes_after"] * 2 == report.details["weight_bytes_before"]
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    similarity = cosine(plain_ort_logits(digits_model, digits_data), plain_ort_logits(dst, digits_data))
    print(f"fp16 digits: cosine {similarity:.6f}")
    assert similarity > 0.999
    assert backend.count_parameters(dst)[0] == backend.count_parameters(digits_model)[0]


def test_prune_then_int8_dynamic_pipeline_reports_everything(
    digits_model: Path, digits_data: EvalData, baseline_accuracy: float
):
    steps = [PruneMagnitude(method="magnitude", sparsity=0.5), QuantizeInt8Dynamic(method="int8_dynamic")]
    stages: list[str] = []
    result = run_pipeline(
        model_path=digits_model,
        fmt="onnx",
        steps=steps,
        data=digits_data,
        options=FAST,
        device="cpu",
        workdir=digits_model.parent,
        progress=lambda fraction, stage: stages.append(stage),
    )
    base, res = result.baseline, result.result
    assert res is not None and result.output_format == "onnx"
    assert stages == ["baseline", "sensitivity", "prune:magnitude", "quantize:int8_dynamic", "evaluate", "done"]
    assert base.accuracy == pytest.approx(baseline_accuracy)
    # Per-layer tables: every weight tensor of each version, with the bytes adding up to the weights stored.
    assert base.layers is not None and res.layers is not None
    assert {row["name"] for row in base.layers} >= {"0.weight", "2.weight", "6.weight", "8.weight"}
    assert sum(row["parameters"] for row in base.layers) == base.parameters
    assert sum(row["parameters"] for row in res.layers) == res.parameters
    assert {row["bits"] for row in res.layers} >= {8, 32}  # Gemm weights int8, Conv left in float
    # Sensitivity: each prunable layer compressed alone changes accuracy by at most what the whole job loses
    # plus noise, and a layer the job cannot touch (none here) would show 0.
    sens = {row["name"]: row["sensitivity"] for row in base.layers if row["prunable"]}
    assert set(sens) == {"0.weight", "2.weight", "6.weight", "8.weight"}
    assert all(-0.1 < v < 0.05 for v in sens.values()), sens
    assert any("per-layer sensitivity" in note for note in result.notes)
    assert (base.cosine, base.agreement, base.sparsity) == (1.0, 1.0, 0.0)
    assert res.accuracy is not None and res.accuracy >= baseline_accuracy - 0.02
    assert res.agreement is not None and res.agreement >= 0.97
    assert res.cosine is not None and res.cosine > 0.98
    for metrics in (base, res):
        assert metrics.latency_ms is not None and 0 < metrics.latency_ms["p50"] <= metrics.latency_ms["p95"]
        assert metrics.samples == digits_data.num_samples
    assert res.parameters == base.parameters
    share = result.steps[0].details["prunable_share"]
    # int8 rounding zeroes a few more weights, never fewer
    assert 0.5 * share - 1e-3 <= res.sparsity <= 0.5 * share + 0.02
    assert res.size_bytes < 0.4 * base.size_bytes
    print(
        f"\nprune 0.5 + int8_dynamic digits: accuracy {base.accuracy:.4f} -> {res.accuracy:.4f}, "
        f"agreement {res.agreement:.4f}, cosine {res.cosine:.4f}, sparsity {res.sparsity:.4f}, "
        f"size {base.size_bytes} -> {res.size_bytes}, latency p50 {base.latency_ms['p50']:.3f} -> "  # type: ignore[index]
        f"{res.latency_ms['p50']:.3f} ms (batch 64)"  # type: ignore[index]
    )


def test_weights_swapped_in_memory_run_as_the_rewritten_model_does(backend: OnnxBackend, tmp_path: Path):
    """A weight ONNX Runtime would constant-fold (here through a Transpose) is still replaced, as in a written
    model; a name that is not a top-level initializer is refused (None), never silently ignored."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])],
        "folded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "folded.onnx"
    onnx.save(model, str(path))
    x = {"x": np.ones((2, 3), dtype=np.float32)}
    new = -2 * w
    backend.with_weights(path, tmp_path / "written.onnx", {"W": new})
    written = plain_ort_outputs(tmp_path / "written.onnx", x)

    swapper = backend.weight_swapper(path, "cpu")
    assert swapper is not None
    swapped = swapper.open({"W": new})
    assert swapped is not None
    np.testing.assert_array_equal(swapped(x)[0], written)
    np.testing.assert_array_equal(swapper.open({})(x)[0], plain_ort_outputs(path, x))  # type: ignore[misc]
    assert swapper.open({"not_a_weight": new}) is None
    assert backend.weight_swapper(path, "cuda") is None


# -- a real transformer -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_int8_dynamic_per_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tests.support.minilm import minilm_arrays, minilm_onnx_path

    started = time.perf_counter()
    model = minilm_onnx_path()
    arrays = minilm_arrays()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # ORT's shape inference dumps files into the working directory when it gives up
    result = run_pipeline(
        model_path=model,
        fmt="onnx",
        steps=[QuantizeInt8Dynamic(method="int8_dynamic", per_channel=True)],
        data=EvalData(arrays),
        options=EvalOptions(batch_size=32, latency_runs=10, warmup_runs=2),
        device="cpu",
        workdir=tmp_path,
    )
    base, res = result.baseline, result.result
    assert res is not None and result.output_path is not None
    assert list(cwd.iterdir()) == []

    # Sentence embeddings as sentence-transformers computes them: mean over real tokens.
    mask = arrays["attention_mask"][..., None].astype(np.float64)
    reference = plain_ort_outputs(model, arrays)
    quantized = plain_ort_outputs(result.output_path, arrays)
    pooled = cosine((reference * mask).sum(1) / mask.sum(1), (quantized * mask).sum(1) / mask.sum(1))
    ratio = base.size_bytes / res.size_bytes
    print(
        f"\nMiniLM int8_dynamic per-channel: {base.size_bytes / 1e6:.1f} -> {res.size_bytes / 1e6:.1f} MB "
        f"({ratio:.2f}x smaller), token cosine {res.cosine:.4f}, sentence-embedding cosine {pooled:.4f}, "
        f"latency p50 {base.latency_ms['p50']:.1f} -> {res.latency_ms['p50']:.1f} ms, "  # type: ignore[index]
        f"p95 {base.latency_ms['p95']:.1f} -> {res.latency_ms['p95']:.1f} ms (batch 32, "  # type: ignore[index]
        f"{arrays['input_ids'].shape[1]} tokens), {time.perf_counter() - started:.1f} s"
    )
    assert ratio >= 3.5
    assert pooled >= 0.99
    # Token-level fidelity over real tokens; padding positions are left out by the pipeline's attention mask.
    assert res.cosine is not None and res.cosine >= 0.985
    assert res.parameters == base.parameters
    assert result.steps[0].details["quantized_weights"] > 36  # 6 layers x 6 matrices, and the embedding table
