"""TorchScript uploads through the HTTP API: detected, inspected, and every job on them checked at the door."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Iterator

import pytest

from app.config import Settings, get_settings
from tests.support.models import digits_npz_bytes, digits_torchscript_bytes


@pytest.fixture
def scripted(client, alice) -> dict:
    r = client.post("/v1/models", headers=alice, files={"file": ("digits.pt", digits_torchscript_bytes("scripted"))})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def dataset_id(client, alice) -> str:
    r = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture
def configure(client) -> Iterator:
    def _set(**values: object) -> None:
        client.app.dependency_overrides[get_settings] = lambda: Settings(**values)

    yield _set
    client.app.dependency_overrides.clear()


def _submit(client, alice, **spec: object):
    return client.post("/v1/jobs", headers=alice, json=spec)


def test_upload_is_inspected_and_downloadable(client, alice, scripted: dict) -> None:
    assert scripted["format"] == "torchscript" and scripted["packaging"] == "file"
    assert scripted["inputs"] == [{"name": "input", "shape": None, "dtype": None}]
    assert scripted["parameters"] == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 64 * 512 + 64 + 10 * 64 + 10
    assert scripted["details"]["details"]["traced"] is False
    r = client.get(f"/v1/models/{scripted['id']}/download", headers=alice)
    assert r.status_code == 200 and r.content == digits_torchscript_bytes("scripted")
    assert f'{scripted["id"]}.pt"' in r.headers["content-disposition"]


def test_scripted_models_need_a_dataset(client, alice, scripted: dict, dataset_id: str) -> None:
    prune = [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]
    r = _submit(client, alice, model_id=scripted["id"], steps=prune)
    assert r.status_code == 422 and r.json()["error"]["code"] == "dataset_required"
    assert "input shapes" in r.json()["error"]["message"]
    r = _submit(client, alice, model_id=scripted["id"], dataset_id=dataset_id, steps=prune)
    assert r.status_code == 202, r.text


def test_traced_models_record_shapes_and_need_no_dataset(client, alice) -> None:
    r = client.post("/v1/models", headers=alice, files={"file": ("t.pt", digits_torchscript_bytes("traced"))})
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["inputs"] == [{"name": "input", "shape": [2, 1, 8, 8], "dtype": "float32"}]
    r = _submit(client, alice, model_id=model["id"], steps=[{"op": "quantize", "method": "fp16"}])
    assert r.status_code == 202, r.text


def test_methods_follow_the_format_along_the_pipeline(client, alice, scripted: dict, dataset_id: str) -> None:
    base = {"model_id": scripted["id"], "dataset_id": dataset_id}
    int8 = {"op": "quantize", "method": "int8_dynamic"}
    r = _submit(client, alice, **base, steps=[int8])
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "method_not_supported" and err["details"]["format"] == "torchscript"
    # After a conversion the ONNX methods apply.
    convert = {"op": "convert", "method": "onnx"}
    r = _submit(client, alice, **base, steps=[{"op": "prune", "method": "magnitude", "sparsity": 0.5}, convert, int8])
    assert r.status_code == 202, r.text
    r = _submit(client, alice, **base, steps=[{"op": "quantize", "method": "bf16"}], output_format="onnx")
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["output_format"] == "onnx"
    # output_format converts last: an ONNX-only method before it is still refused.
    r = _submit(client, alice, **base, steps=[int8], output_format="onnx")
    assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_supported"


def test_capabilities_list_torchscript_and_conversions(client, alice) -> None:
    caps = client.get("/v1/capabilities", headers=alice).json()
    assert caps["formats"]["torchscript"]["suffix"] == ".pt"
    methods = caps["methods"]["torchscript"]
    assert set(methods["quantize"]) == {"fp16", "bf16"} and "magnitude" in methods["prune"]
    for fmt in ("torchscript", "pt2"):
        assert caps["methods"][fmt]["convert"]["onnx"]["produces"] == "onnx"


def test_hostile_archive_is_refused_and_not_stored(client, alice) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    src = zipfile.ZipFile(io.BytesIO(digits_torchscript_bytes("scripted")))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            out.writestr(info, pickle.dumps(Payload(), protocol=2) if info.filename.endswith("/data.pkl") else data)
    r = client.post("/v1/models", headers=alice, files={"file": ("m.pt", buf.getvalue())})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsafe_model"
    assert r.json()["error"]["details"]["imports"] == ["__builtin__.print"]  # protocol 2 spells builtins so
    assert client.get("/v1/models", headers=alice).json()["items"] == []


def test_torchscript_can_be_switched_off(client, alice, configure) -> None:
    configure(allowed_formats=["onnx", "pt2"])
    r = client.post("/v1/models", headers=alice, files={"file": ("m.pt", digits_torchscript_bytes("scripted"))})
    assert r.status_code == 422 and r.json()["error"]["code"] == "format_disabled"
