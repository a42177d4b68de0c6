"""The hf backend on a real trained transformers classifier (BERT, 2 layers, on digits written as text; see
tests/support/hf_models.py): run, count, prune (magnitude, N:M, Wanda), fine-tune, cast, refuse.

Artifacts are checked through transformers' own loaders, and accuracies are the ones measured on the held-out digits,
not assumed. int8 quantization and ONNX conversion run through the service in tests/e2e/test_hf.py, where the
downloaded artifacts are loaded by plain transformers (a fresh Python) and plain ONNX Runtime.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.jobs.spec import JobSpec, PruneMagnitude, PruneWanda, QuantizeInt8WeightOnly
from tests.support.hf_folders import folder_zip_bytes
from tests.support.hf_models import (
    classifier_folder,
    classifier_zip_bytes,
    digits_jsonl_bytes,
    held_out_accuracy,
)
from worker.compress.backend import get_backend
from worker.compress.hf_format import load_text_dataset, model_folder
from worker.compress.pipeline import run_pipeline
from worker.compress.types import CompressionError, EvalData, StepContext

PARAMETERS = 84_618  # embeddings 133x64 + 64x64 + 2x64, 2 layers, pooler, classifier; as the API counts them
PAD_ROW = 64  # BERT keeps the [PAD] token's embedding at zero
PRUNABLE = 70_272  # the nn.Linear weights
LINEAR = 2 * 6 + 2  # query, key, value, attention output, intermediate, output per layer; pooler; classifier
FAST = {"latency_runs": 2, "warmup_runs": 1, "layer_sensitivity": "off"}


@pytest.fixture(scope="module")
def backend():
    return get_backend("hf")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def model(workdir: Path) -> Path:
    path = workdir / "digits-bert.zip"
    path.write_bytes(classifier_zip_bytes())
    return path


@pytest.fixture(scope="module")
def data(workdir: Path, model: Path) -> EvalData:
    path = workdir / "digits.jsonl"
    path.write_bytes(digits_jsonl_bytes())
    return load_text_dataset(path, model)


@pytest.fixture(scope="module")
def reference_accuracy() -> float:
    """Held-out accuracy of the uploaded folder through plain transformers and its own tokenizer."""
    return held_out_accuracy(classifier_folder())


def _run(model: Path, data: EvalData, workdir: Path, steps: list[dict], **evaluation: object):
    spec = JobSpec.model_validate({"model_id": "m", "steps": steps, "evaluation": {**FAST, **evaluation}})
    out = workdir / f"run-{len(list(workdir.glob('run-*')))}"
    out.mkdir()
    return run_pipeline(
        model_path=model,
        fmt="hf",
        steps=spec.effective_steps(),
        data=data,
        options=spec.evaluation,
        device="cpu",
        workdir=out,
    )


def _unzipped(path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(path) as zf:
        zf.extractall(dest)
    return dest


# ----------------------------------------------------------------------------------------------------------


def test_runner_counts_and_dataset(backend, model: Path, data: EvalData, reference_accuracy: float) -> None:
    assert set(data.inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert data.inputs["input_ids"].shape[0] == 397 and data.labels is not None
    logits = backend.open_runner(model, "cpu")(data.inputs)[0]
    assert logits.shape == (397, 10) and logits.dtype == np.float32
    assert float((logits.argmax(1) == data.labels).mean()) == pytest.approx(reference_accuracy, abs=1e-9)
    assert reference_accuracy > 0.8  # a real classifier: digits as words, 10 classes
    assert backend.count_parameters(model) == (PARAMETERS, PARAMETERS - PAD_ROW)
    rows = backend.layers(model)
    assert sum(r["prunable"] for r in rows) == LINEAR and len(backend.prunable_weights(model)) == LINEAR
    folder = model_folder(model)
    assert backend.stored_size(model) == sum(p.stat().st_size for p in folder.iterdir())


def test_jsonl_class_names_map_through_id2label(workdir: Path, model: Path, data: EvalData) -> None:
    named = workdir / "named.jsonl"
    named.write_bytes(digits_jsonl_bytes(names=True))
    assert np.array_equal(load_text_dataset(named, model, limit=50).labels, data.labels[:50])


def test_pickled_files_beside_the_weights_are_removed_on_extraction(workdir: Path) -> None:
    upload = workdir / "with-bin.zip"
    upload.write_bytes(folder_zip_bytes(classifier_folder(), extra={"pytorch_model.bin": b"\x80\x04not read"}))
    folder = model_folder(upload)
    assert (folder / "model.safetensors").exists() and not (folder / "pytorch_model.bin").exists()


def test_magnitude_pruning_keeps_the_folder_loadable(
    model: Path, data: EvalData, workdir: Path, reference_accuracy: float
) -> None:
    result = _run(
        model, data, workdir, [{"op": "prune", "method": "magnitude", "sparsity": 0.5}], layer_sensitivity="on"
    )
    base, res = result.baseline, result.result
    assert res is not None and result.output_format == "hf" and result.output_path.suffix == ".zip"
    assert result.steps[0].details["achieved"] == 0.5
    assert base.accuracy == pytest.approx(reference_accuracy, abs=1e-9)
    assert res.accuracy >= base.accuracy - 0.05 and res.parameters == PARAMETERS
    assert res.sparsity == pytest.approx((PRUNABLE // 2 + PAD_ROW) / PARAMETERS, abs=1e-6)  # Linear weights only
    sensitive = [r for r in base.layers if "sensitivity" in r]
    assert len(sensitive) == LINEAR and any(r["sensitivity"] < 0 for r in sensitive)
    folder = _unzipped(result.output_path, workdir / "magnitude")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert held_out_accuracy(folder) == pytest.approx(res.accuracy, abs=1e-9)


def test_n_m_pattern(backend, model: Path, workdir: Path) -> None:
    dst = workdir / "nm.zip"
    report = backend.prune_magnitude(model, dst, PruneMagnitude(method="magnitude", pattern="2:4"))
    assert report.details["achieved"] == 0.5
    for name, (w, _) in backend.prunable_weights(dst).items():
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(axis=2)
        assert groups.max() <= 2, name


def test_wanda_prunes_each_output_neuron_and_ignores_padding(
    backend, model: Path, data: EvalData, workdir: Path
) -> None:
    ctx = StepContext(data=data, device="cpu", original=model, original_format="hf", workdir=workdir)
    step = PruneWanda(method="wanda", sparsity=0.5, calibration_samples=64)
    report = backend.prune_wanda(model, workdir / "wanda.zip", step, ctx)
    assert report.details["achieved_sparsity"] == 0.5 and report.details["calibration_samples"] == 64
    pruned = backend.prunable_weights(workdir / "wanda.zip")
    for name, (w, _) in pruned.items():
        assert ((w == 0).sum(axis=1) == w.shape[1] // 2).all(), name  # half of every output neuron's inputs
    # Activation norms decide, not magnitudes alone: the masks differ from per-row magnitude pruning.
    original = backend.prunable_weights(model)
    w, _ = original["bert.encoder.layer.0.intermediate.dense.weight"]
    by_magnitude = np.abs(w) > np.median(np.abs(w), axis=1, keepdims=True)
    assert (by_magnitude != (pruned["bert.encoder.layer.0.intermediate.dense.weight"][0] != 0)).mean() > 0.05
    # Padded tokens are left out of the norms: other token ids under the padding change nothing.
    mask = data.inputs["attention_mask"] == 0
    assert mask.any()
    noisy = dict(data.inputs, input_ids=np.where(mask, 7, data.inputs["input_ids"]))
    noisy_ctx = StepContext(
        data=EvalData(noisy, data.labels), device="cpu", original=model, original_format="hf", workdir=workdir
    )
    backend.prune_wanda(model, workdir / "wanda-noisy.zip", step, noisy_ctx)
    again = backend.prunable_weights(workdir / "wanda-noisy.zip")
    assert all(np.array_equal(again[n][0] != 0, pruned[n][0] != 0) for n in pruned)


def test_prune_then_finetune_recovers_accuracy(model: Path, data: EvalData, workdir: Path) -> None:
    steps = [
        {"op": "prune", "method": "magnitude", "sparsity": 0.8},
        {"op": "finetune", "method": "labels", "epochs": 2, "lr": 0.002},
    ]
    result = _run(model, data, workdir, steps)
    tune = result.steps[1].details
    assert tune["accuracy_after"] > tune["accuracy_before"] + 0.05, tune
    assert tune["sparsity_after"] == tune["sparsity_before"] and result.result.sparsity > 0.6


def test_fp16_halves_the_folder(model: Path, data: EvalData, workdir: Path, reference_accuracy: float) -> None:
    result = _run(model, data, workdir, [{"op": "quantize", "method": "fp16"}])
    assert result.result.size_bytes < 0.55 * result.baseline.size_bytes
    assert result.result.accuracy == pytest.approx(reference_accuracy, abs=0.01)
    config = json.loads(zipfile.ZipFile(result.output_path).read("config.json"))
    assert config["dtype"] == "float16"


def test_embedding_quantization_is_refused_clearly(backend, model: Path, workdir: Path) -> None:
    ctx = StepContext(data=None, device="cpu", original=model, original_format="hf", workdir=workdir)
    step = QuantizeInt8WeightOnly(method="int8_weight_only", include=["embedding"])
    with pytest.raises(CompressionError) as info:
        backend.quantize_int8_weight_only(model, workdir / "e.zip", step, ctx)
    assert info.value.code == "method_not_supported"


def test_steps_refuse_work_they_cannot_do(backend, model: Path, workdir: Path) -> None:
    ctx = StepContext(data=None, device="cpu", original=model, original_format="hf", workdir=workdir)
    with pytest.raises(CompressionError) as info:
        backend.prune_wanda(model, workdir / "w.zip", PruneWanda(method="wanda", sparsity=0.5), ctx)
    assert info.value.code == "dataset_required"
    for name, data, code in (
        ("empty.zip", b"PK\x05\x06" + bytes(18), "invalid_model"),
        ("x.zip", b"PK\x03\x04" * 9, "invalid_archive"),
    ):
        garbage = workdir / name
        garbage.write_bytes(data)
        with pytest.raises(CompressionError) as info:
            backend.open_runner(garbage, "cpu")
        assert info.value.code == code
