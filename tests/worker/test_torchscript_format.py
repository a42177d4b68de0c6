"""The TorchScript backend on the real trained digits CNN, scripted and traced: run, count, prune, cast, convert.

Artifacts are checked through the ordinary loaders (``torch.jit.load``, ONNX Runtime), not only through our runner.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.jobs.spec import (
    ConvertOnnx,
    EvalOptions,
    PruneMagnitude,
    QuantizeBf16,
    QuantizeFp16,
    QuantizeInt8Dynamic,
)
from tests.support.models import digits_arrays, digits_onnx_bytes, digits_torchscript_bytes
from worker.compress.backend import get_backend
from worker.compress.pipeline import run_pipeline
from worker.compress.types import CompressionError, EvalData, StepContext

DIGITS_PARAMETERS = 16 * 9 + 16 + 32 * 16 * 9 + 32 + 64 * 512 + 64 + 10 * 64 + 10
PRUNABLE = {"0.weight", "2.weight", "6.weight", "8.weight"}
LAYER_KEYS = {"name", "op", "shape", "parameters", "nonzero", "sparsity", "bits", "bytes", "prunable"}


@pytest.fixture(scope="module")
def backend():
    return get_backend("torchscript")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torchscript")


@pytest.fixture(scope="module", params=["scripted", "traced"])
def model(request: pytest.FixtureRequest, workdir: Path) -> Path:
    path = workdir / f"digits-{request.param}.pt"
    path.write_bytes(digits_torchscript_bytes(request.param))
    return path


@pytest.fixture(scope="module")
def data() -> EvalData:
    _, _, x_test, y_test = digits_arrays()
    return EvalData({"input": x_test}, y_test)


@pytest.fixture(scope="module")
def reference_accuracy(data: EvalData) -> float:
    """The digits CNN's test accuracy through its ONNX export (built from the same trained weights, cached on disk,
    so no test here trains the model again)."""
    sess = ort.InferenceSession(digits_onnx_bytes(), providers=["CPUExecutionProvider"])
    return _accuracy(sess.run(None, data.inputs)[0], data.labels)


def _ctx(model: Path, data: EvalData | None, workdir: Path) -> StepContext:
    return StepContext(data=data, device="cpu", original=model, original_format="torchscript", workdir=workdir)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def _plain_torch_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Outputs through torch's own API only: what a user does with the downloaded artifact."""
    module = torch.jit.load(str(path))
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    assert out.dtype == torch.float32  # the signature a user calls is unchanged by every step
    return out.numpy()


# --- loading, running, counting ----------------------------------------------------------------------


def test_runner_reads_the_forward_schema(backend, model: Path, data: EvalData, reference_accuracy: float) -> None:
    runner = backend.open_runner(model, "cpu")
    assert runner.runtime == f"torch {torch.__version__.split('+')[0]} cpu (TorchScript)"
    assert runner.input_names == ["input"] and runner.device == "cpu"
    logits = runner(data.inputs)[0]
    assert _accuracy(logits, data.labels) == pytest.approx(
        reference_accuracy, abs=0.003
    )  # another runtime: one sample at most
    # A single-input model takes the array under its own name or the documented aliases only.
    assert np.allclose(runner({"inputs": data.inputs["input"][:5]})[0], logits[:5], atol=1e-4)
    with pytest.raises(CompressionError) as info:
        runner({"pixels": data.inputs["input"][:5]})
    assert info.value.code == "input_mismatch" and info.value.details["expected_inputs"] == ["input"]


def test_parameters_and_layer_table(backend, model: Path) -> None:
    assert backend.count_parameters(model) == (DIGITS_PARAMETERS, DIGITS_PARAMETERS)
    rows = backend.layers(model)
    assert all(set(r) == LAYER_KEYS for r in rows)
    assert sum(r["parameters"] for r in rows) == DIGITS_PARAMETERS
    assert {r["name"] for r in rows if r["prunable"]} == PRUNABLE
    ops = {r["name"]: r["op"] for r in rows}
    assert ops["6.weight"] == "linear" and ops["0.weight"] in ("conv2d", "_convolution")
    assert all(r["bits"] == 32 and r["bytes"] == 4 * r["parameters"] and r["sparsity"] == 0.0 for r in rows)


def test_random_inputs_need_traced_shapes(backend, model: Path) -> None:
    if "traced" in model.name:
        inputs = backend.example_inputs(model, 5)
        assert inputs["input"].shape == (5, 1, 8, 8) and inputs["input"].dtype == np.float32
        assert backend.open_runner(model, "cpu")(inputs)[0].shape == (5, 10)
    else:
        with pytest.raises(CompressionError) as info:
            backend.example_inputs(model, 5)
        assert info.value.code == "dataset_required" and "scripted" in info.value.message


# --- pruning -------------------------------------------------------------------------------------------


def test_magnitude_pruning_is_exact_and_loads_in_plain_torch(
    backend, model: Path, data: EvalData, reference_accuracy: float, workdir: Path
) -> None:
    dst = workdir / f"pruned-{model.name}"
    step = PruneMagnitude(method="magnitude", sparsity=0.5)
    report = backend.prune_magnitude(model, dst, step, _ctx(model, data, workdir))
    prunable = 16 * 9 + 32 * 16 * 9 + 64 * 512 + 10 * 64
    assert report.details["prunable_parameters"] == prunable
    assert report.details["zeros"] == round(0.5 * prunable) and report.details["achieved"] == pytest.approx(0.5, 1e-4)
    weights = dict(torch.jit.load(str(dst)).named_parameters())
    zeros = sum(int((weights[n] == 0).sum()) for n in PRUNABLE)
    assert zeros == report.details["zeros"]
    assert all(int((weights[n] == 0).sum()) == 0 for n in weights if n.endswith("bias"))
    assert backend.count_parameters(dst) == (DIGITS_PARAMETERS, DIGITS_PARAMETERS - zeros)
    accuracy = _accuracy(_plain_torch_logits(dst, data.inputs["input"]), data.labels)
    assert accuracy >= reference_accuracy - 0.03


def test_pattern_and_overrides(backend, model: Path, workdir: Path) -> None:
    dst = workdir / f"nm-{model.name}"
    step = PruneMagnitude(method="magnitude", pattern="2:4", overrides={"0.*": 0.0})
    backend.prune_magnitude(model, dst, step, None)
    weights = {k: v.detach().numpy() for k, v in torch.jit.load(str(dst)).named_parameters()}
    assert (weights["0.weight"] != 0).all()  # excluded by the override
    fc = weights["6.weight"]  # [64, 512]: groups of 4 along the input axis keep at most 2
    assert ((fc.reshape(64, 128, 4) != 0).sum(axis=2) <= 2).all()
    assert (fc == 0).mean() == pytest.approx(0.5)


def test_pruning_a_model_without_prunable_weights_is_refused(backend, workdir: Path) -> None:
    path = workdir / "relu.pt"
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), str(path))
    with pytest.raises(CompressionError) as info:
        backend.prune_magnitude(path, workdir / "x.pt", PruneMagnitude(method="magnitude", sparsity=0.5), None)
    assert info.value.code == "nothing_to_prune"


# --- precision -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_keeps_the_signature(
    backend, model: Path, data: EvalData, reference_accuracy: float, workdir: Path, method: str, dtype: torch.dtype
) -> None:
    dst = workdir / f"{method}-{model.name}"
    step = QuantizeFp16(method="fp16") if method == "fp16" else QuantizeBf16(method="bf16")
    report = getattr(backend, f"quantize_{method}")(model, dst, step, _ctx(model, data, workdir))
    assert report.details["cast_tensors"] == 8 and report.details["size_ratio"] < 0.6
    loaded = torch.jit.load(str(dst))
    assert [a.name for a in loaded.forward.schema.arguments[1:]] == ["input"]
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    accuracy = _accuracy(_plain_torch_logits(dst, data.inputs["input"]), data.labels)
    assert accuracy >= reference_accuracy - 0.02
    # Layer names are the original module's; the boundary that casts inputs and outputs is looked through.
    rows = backend.layers(dst)
    assert {r["name"] for r in rows if r["prunable"]} == PRUNABLE
    assert {r["bits"] for r in rows} == {16}


def test_pruning_after_fp16_and_casting_twice(
    backend, model: Path, data: EvalData, reference_accuracy: float, workdir: Path
) -> None:
    half = workdir / f"half-{model.name}"
    backend.quantize_fp16(model, half, QuantizeFp16(method="fp16"), None)
    pruned = workdir / f"half-pruned-{model.name}"
    report = backend.prune_magnitude(half, pruned, PruneMagnitude(method="magnitude", sparsity=0.5), None)
    assert report.details["achieved"] == pytest.approx(0.5, abs=1e-3)
    bf16 = workdir / f"half-pruned-bf16-{model.name}"
    backend.quantize_bf16(pruned, bf16, QuantizeBf16(method="bf16"), None)
    assert {p.dtype for p in torch.jit.load(str(bf16)).parameters()} == {torch.bfloat16}
    accuracy = _accuracy(_plain_torch_logits(bf16, data.inputs["input"]), data.labels)
    assert accuracy >= reference_accuracy - 0.04


# --- conversion to ONNX -------------------------------------------------------------------------------


def test_converted_onnx_computes_the_same_in_plain_onnxruntime(
    backend, model: Path, data: EvalData, workdir: Path
) -> None:
    dst = workdir / f"{model.stem}.onnx"
    report = backend.convert_onnx(model, dst, ConvertOnnx(method="onnx"), _ctx(model, data, workdir))
    assert report.output_format == "onnx" and report.details["opset"] == 18
    assert report.details["runtime"].startswith("onnxruntime ")
    assert report.details["max_abs_difference"] < 1e-4
    assert not Path(str(dst) + ".data").exists()  # self-contained
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "input" and inp.shape[0] == "batch"  # the batch dimension is dynamic
    x = data.inputs["input"]
    logits = sess.run(None, {"input": x})[0]
    reference = backend.open_runner(model, "cpu")(data.inputs)[0]
    assert np.abs(logits - reference).max() < 1e-4
    assert _accuracy(logits, data.labels) == pytest.approx(_accuracy(reference, data.labels), abs=1e-9)


def test_scripted_conversion_without_data_needs_a_dataset(backend, workdir: Path) -> None:
    model = workdir / "scripted-only.pt"
    model.write_bytes(digits_torchscript_bytes("scripted"))
    with pytest.raises(CompressionError) as info:
        backend.convert_onnx(model, workdir / "x.onnx", ConvertOnnx(method="onnx"), _ctx(model, None, workdir))
    assert info.value.code == "dataset_required"


# --- the pipeline ---------------------------------------------------------------------------------------


def test_pipeline_prunes_converts_and_quantizes_in_onnx(
    data: EvalData, reference_accuracy: float, workdir: Path
) -> None:
    model = workdir / "pipeline-in.pt"
    model.write_bytes(digits_torchscript_bytes("scripted"))
    out = workdir / "pipeline"
    out.mkdir()
    steps = [
        PruneMagnitude(method="magnitude", sparsity=0.5),
        ConvertOnnx(method="onnx"),
        QuantizeInt8Dynamic(method="int8_dynamic"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's TorchScript exporter is deprecated (still the only one)
        result = run_pipeline(
            model_path=model,
            fmt="torchscript",
            steps=steps,
            data=data,
            options=EvalOptions(latency_runs=3, warmup_runs=1, layer_sensitivity="off"),
            device="cpu",
            workdir=out,
        )
    assert result.output_format == "onnx" and result.output_path is not None
    assert result.output_path.suffix == ".onnx"
    base, res = result.baseline, result.result
    assert res is not None
    assert base.runtime.endswith("(TorchScript)") and res.runtime.startswith("onnxruntime ")
    assert base.accuracy == pytest.approx(reference_accuracy, abs=0.003)  # another runtime: one sample at most
    assert res.accuracy is not None and res.accuracy >= base.accuracy - 0.03
    assert res.sparsity > 0.4 and res.size_bytes < base.size_bytes / 2.5
    assert [r.op for r in result.steps] == ["prune", "convert", "quantize"]
    assert result.steps[1].output_format == "onnx"


def test_prints_in_the_model_stay_off_stdout(backend, workdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """stdout carries the sandbox's result lines: a model's own print() must not land there."""

    class Noisy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print("noisy model says hello")
            return x * 2

    path = workdir / "noisy.pt"
    torch.jit.save(torch.jit.script(Noisy()), str(path))
    capfd.readouterr()
    out = backend.open_runner(path, "cpu")({"x": np.ones((2, 3), np.float32)})
    assert np.array_equal(out[0], np.full((2, 3), 2.0, np.float32))
    captured = capfd.readouterr()
    assert "noisy model" not in captured.out and "noisy model says hello" in captured.err
