"""Hugging Face model folders and JSONL datasets through the HTTP API: detected, inspected, refused with a code a
client can act on, and every job on them checked at the door (no worker runs here)."""

from __future__ import annotations

import pickle

import pytest

from tests.support.hf_folders import TINY_CONFIG, TINY_PARAMETERS, tar_files, tiny_folder, zip_files
from tests.support.models import digits_onnx_bytes

LABELLED = b'{"text": "hello", "label": "pos"}\n{"text": "hello hello", "label": "neg"}\n'


def _upload(client, alice, path: str, name: str, data: bytes) -> dict:
    r = client.post(path, headers=alice, files={"file": (name, data)})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def classifier(client, alice) -> dict:
    return _upload(client, alice, "/v1/models", "m.zip", zip_files(tiny_folder(), "my-model"))


@pytest.fixture
def texts(client, alice) -> dict:
    return _upload(client, alice, "/v1/datasets", "d.jsonl", LABELLED)


def _submit(client, alice, **spec: object):
    return client.post("/v1/jobs", headers=alice, json=spec)


def test_folders_are_inspected_and_downloadable_as_uploaded(client, alice, classifier: dict) -> None:
    assert (classifier["format"], classifier["packaging"], classifier["parameters"]) == ("hf", "zip", TINY_PARAMETERS)
    assert [i["name"] for i in classifier["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert classifier["outputs"] == [{"name": "logits", "shape": ["batch", 2], "dtype": "float32"}]
    assert classifier["details"]["details"]["task"] == "sequence-classification"
    r = client.get(f"/v1/models/{classifier['id']}/download", headers=alice)
    assert r.status_code == 200 and r.content == zip_files(tiny_folder(), "my-model")
    assert f'{classifier["id"]}.zip"' in r.headers["content-disposition"]
    tarred = _upload(client, alice, "/v1/models", "m.tar", tar_files(tiny_folder()))
    assert tarred["packaging"] == "tar"
    r = client.get(f"/v1/models/{tarred['id']}/download", headers=alice)
    assert f'{tarred["id"]}.tar"' in r.headers["content-disposition"]


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"config.json": {**TINY_CONFIG, "auto_map": {"AutoModel": "modeling.M"}}}, "remote_code_not_allowed"),
        ({"modeling_custom.py": b"import os\n"}, "remote_code_not_allowed"),
        ({"model.safetensors": None, "pytorch_model.bin": pickle.dumps({"w": 1})}, "pickled_weights_not_accepted"),
    ],
)
def test_folders_needing_code_or_pickles_are_refused_and_not_kept(
    client, alice, data_dir, changes: dict, code: str
) -> None:
    before = sorted(p.name for p in data_dir.rglob("*") if p.is_file())
    r = client.post("/v1/models", headers=alice, files={"file": ("m.zip", zip_files(tiny_folder(changes)))})
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
    assert sorted(p.name for p in data_dir.rglob("*") if p.is_file()) == before
    assert client.get("/v1/models", headers=alice).json()["items"] == []


def test_jsonl_datasets_are_inspected(client, alice, texts: dict) -> None:
    assert (texts["format"], texts["num_samples"], texts["has_labels"]) == ("jsonl", 2, True)
    assert texts["arrays"]["text"] == {"shape": [2], "dtype": "text"}
    assert texts["label_values"] == ["neg", "pos"]
    listed = client.get(f"/v1/datasets/{texts['id']}", headers=alice).json()
    assert listed["format"] == "jsonl" and listed["label_values"] == ["neg", "pos"]


def test_a_bad_jsonl_line_is_refused_with_its_number(client, alice) -> None:
    data = b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "label": 1,}\n'
    r = client.post("/v1/datasets", headers=alice, files={"file": ("d.jsonl", data)})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_dataset" and error["details"]["line"] == 3
    assert error["message"].startswith("line 3:")


def test_jobs_on_folders_are_checked_at_the_door(client, alice, classifier: dict, texts: dict) -> None:
    base = {"model_id": classifier["id"], "dataset_id": texts["id"]}
    wanda = {"op": "prune", "method": "wanda", "sparsity": 0.5}
    r = _submit(client, alice, **base, steps=[wanda, {"op": "quantize", "method": "int8_weight_only"}])
    assert r.status_code == 202, r.text
    r = _submit(
        client,
        alice,
        **base,
        steps=[{"op": "convert", "method": "onnx"}, {"op": "quantize", "method": "int4_weight_only"}],
    )
    assert r.status_code == 202, r.text  # after the conversion, the ONNX methods apply
    for steps in ([{"op": "quantize", "method": "int8_static"}], [{"op": "encode", "method": "squeeze"}]):
        r = _submit(client, alice, **base, steps=steps)
        assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_supported"
        assert r.json()["error"]["details"]["format"] == "hf"
    # Embedding tables: refused at the door for hf (never a job that fails in the worker), fine after conversion.
    tables = {"op": "quantize", "method": "int8_weight_only", "include": ["embedding"]}
    r = _submit(client, alice, **base, steps=[tables])
    assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_supported", r.text
    assert r.json()["error"]["details"]["options"] == ["include"] and "include" in r.json()["error"]["message"]
    r = _submit(client, alice, **base, steps=[{"op": "convert", "method": "onnx"}, tables])
    assert r.status_code == 202, r.text
    r = _submit(client, alice, model_id=classifier["id"], steps=[wanda])
    assert r.status_code == 422 and r.json()["error"]["code"] == "dataset_required"
    unlabelled = _upload(client, alice, "/v1/datasets", "u.jsonl", b'{"text": "hello"}\n')
    finetune = {"op": "finetune", "method": "labels"}
    r = _submit(client, alice, model_id=classifier["id"], dataset_id=unlabelled["id"], steps=[finetune])
    assert r.status_code == 422 and r.json()["error"]["code"] == "labels_required"


def test_jsonl_datasets_need_an_hf_model_with_a_tokenizer_and_its_classes(client, alice, texts: dict) -> None:
    prune = [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]
    onnx_model = _upload(client, alice, "/v1/models", "m.onnx", digits_onnx_bytes())
    no_tokenizer = _upload(
        client, alice, "/v1/models", "n.zip", zip_files(tiny_folder({"vocab.txt": None, "tokenizer_config.json": None}))
    )
    other_classes = _upload(
        client,
        alice,
        "/v1/models",
        "o.zip",
        zip_files(tiny_folder({"config.json": {**TINY_CONFIG, "id2label": {"0": "a", "1": "b"}}})),
    )
    for model, words in (
        (onnx_model, "Tokenize the texts yourself"),
        (no_tokenizer, "no tokenizer files"),
        (other_classes, "are not classes of the model"),
    ):
        r = _submit(client, alice, model_id=model["id"], dataset_id=texts["id"], steps=prune)
        assert r.status_code == 422 and r.json()["error"]["code"] == "dataset_mismatch", r.text
        assert words in r.json()["error"]["message"]


def test_capabilities_list_the_hf_format(client, alice) -> None:
    body = client.get("/v1/capabilities", headers=alice).json()
    assert (
        body["formats"]["hf"]["suffix"] == ".zip" and "trust_remote_code=False" in body["formats"]["hf"]["description"]
    )
    methods = body["methods"]["hf"]
    assert set(methods["prune"]) == {"magnitude", "wanda"} and methods["prune"]["wanda"]["needs_dataset"]
    assert set(methods["quantize"]) == {"int8_weight_only", "int8_dynamic", "fp16", "bf16"}
    assert methods["convert"]["onnx"]["produces"] == "onnx"
