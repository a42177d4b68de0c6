"""Per-layer sensitivity with the weights swapped in memory gives exactly what it gives with each one-layer variant
written as a model file and loaded again, for every format that has both paths; the model is left as stored."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from app.jobs.spec import EvalOptions, PruneMagnitude, QuantizeInt8Dynamic, QuantizeInt8WeightOnly, Step
from tests.support.hf_models import classifier_zip_bytes, digits_jsonl_bytes
from tests.support.models import digits_npz_bytes, digits_onnx_bytes, digits_pt2_bytes, digits_torchscript_bytes
from worker.compress.backend import get_backend
from worker.compress.sensitivity import layer_sensitivity
from worker.compress.types import EvalData

OPTIONS = EvalOptions(batch_size=64, layer_sensitivity="on")
PRUNE = PruneMagnitude(op="prune", method="magnitude", sparsity=0.7)


def _digits() -> EvalData:
    arrays = np.load(io.BytesIO(digits_npz_bytes()))
    return EvalData({"input": arrays["input"]}, arrays["labels"])


def _case(fmt: str, tmp_path: Path) -> tuple[Path, EvalData, list[Step]]:
    if fmt == "hf":
        from worker.compress.hf_format import load_text_dataset

        model = tmp_path / "bert.zip"
        model.write_bytes(classifier_zip_bytes())
        (tmp_path / "digits.jsonl").write_bytes(digits_jsonl_bytes())
        steps: list[Step] = [PRUNE, QuantizeInt8WeightOnly(op="quantize", method="int8_weight_only")]
        return model, load_text_dataset(tmp_path / "digits.jsonl", model), steps
    suffix, body = {
        "onnx": (".onnx", digits_onnx_bytes),
        "pt2": (".pt2", digits_pt2_bytes),
        "torchscript": (".pt", digits_torchscript_bytes),
    }[fmt]
    model = tmp_path / f"digits{suffix}"
    model.write_bytes(body())
    quantize = QuantizeInt8Dynamic(op="quantize", method="int8_dynamic")
    return model, _digits(), [PRUNE] + ([quantize] if fmt != "torchscript" else [])


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript", "hf"])
def test_swapped_in_memory_equals_written_and_leaves_the_model_as_stored(fmt: str, tmp_path: Path):
    model, data, steps = _case(fmt, tmp_path)
    found: dict[str, dict[str, float]] = {}
    for how in ("swapped", "written"):
        backend = get_backend(fmt)
        if how == "written":
            backend.weight_swapper = lambda path, device: None  # type: ignore[attr-defined]
        baseline = SimpleNamespace(layers=[{"name": name} for name in backend.prunable_weights(model)])  # type: ignore[attr-defined]
        layer_sensitivity(backend, model, steps, data, OPTIONS, "cpu", baseline, tmp_path)  # type: ignore[arg-type]
        found[how] = {row["name"]: row["sensitivity"] for row in baseline.layers}
    assert len(found["written"]) >= 4
    assert found["swapped"] == found["written"]
    assert min(found["written"].values()) < 0  # the steps cost accuracy somewhere: a real comparison
    assert not (tmp_path / "sensitivity").exists()

    # A swap is undone by the next one: after a variant, open({}) runs the model exactly as a fresh load does
    # (a fresh swapper's: ONNX ones run the graph unoptimized, which moves the last float digits).
    backend = get_backend(fmt)
    swapper = backend.weight_swapper(model, "cpu")  # type: ignore[attr-defined]
    name, (w, _) = next(iter(backend.prunable_weights(model).items()))  # type: ignore[attr-defined]
    head = data.head(32).inputs
    assert swapper.open({name: np.zeros_like(w)}) is not None
    changed = swapper.open({name: np.zeros_like(w)})(head)[0]
    restored = swapper.open({})(head)[0]
    fresh = get_backend(fmt).weight_swapper(model, "cpu").open({})(head)[0]  # type: ignore[attr-defined]
    assert not np.array_equal(changed, fresh)
    np.testing.assert_array_equal(restored, fresh)
    assert swapper.open({"no.such.weight": w}) is None
