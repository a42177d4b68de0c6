"""Hugging Face model folders and JSONL datasets against ``app.inspection``: real archives built here, nothing mocked.

The folders are synthetic (a config, a numpy-written safetensors file, a vocabulary): inspection reads JSON and
safetensors headers only, so no torch is needed, and none may be imported (checked at the end).
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from app.errors import InvalidUpload
from app.inspection import DatasetInspection, check_dataset_for_model, inspect_dataset, inspect_model
from app.inspection.archive import safe_extract_archive
from app.inspection.text_dataset import MAX_LINE_BYTES
from tests.security.test_inspection import Canary, make_zip, refused, tree, write
from tests.support.hf_folders import TINY_CONFIG, TINY_PARAMETERS, tar_files, tiny_folder, zip_files
from tests.support.models import ROOT, digits_onnx_bytes

CONFIG = TINY_CONFIG
PARAMETERS = TINY_PARAMETERS
folder = tiny_folder


def as_zip(files: dict[str, bytes], root: str = "") -> bytes:
    return zip_files(files, root.rstrip("/"))


def as_tar(files: dict[str, bytes], root: str = "", extra: list[tarfile.TarInfo] | None = None) -> bytes:
    return tar_files(files, root.rstrip("/"), extra)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------------------------------- good folders


@pytest.mark.parametrize("packaging", ["zip", "tar"])
@pytest.mark.parametrize("root", ["", "my-model/"])
def test_model_folder_is_inspected(tmp_path: Path, workdir: Path, packaging: str, root: str) -> None:
    data = as_zip(folder(), root) if packaging == "zip" else as_tar(folder(), root)
    result = inspect_model(write(tmp_path, "upload", data), workdir)
    assert (result.format, result.packaging, result.parameters) == ("hf", packaging, PARAMETERS)
    assert [(i.name, i.shape, i.dtype) for i in result.inputs] == [
        (name, ["batch", "sequence"], "int64") for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert [(o.name, o.shape) for o in result.outputs] == [("logits", ["batch", 2])]
    details = result.details
    assert (details["task"], details["model_type"], details["root"]) == ("sequence-classification", "bert", root[:-1])
    assert details["tokenizer"] is True and details["labels"] == ["neg", "pos"]
    assert details["optional_inputs"] == ["attention_mask", "token_type_ids"]
    assert details["weight_dtypes"] == ["F32", "F64"]
    assert not any(workdir.iterdir())  # read in place: nothing extracted in the API


def test_base_model_without_tokenizer_is_inspected(tmp_path: Path, workdir: Path) -> None:
    config = {**CONFIG, "architectures": ["BertModel"], "type_vocab_size": 1}
    files = folder({"config.json": config, "vocab.txt": None, "tokenizer_config.json": None})
    result = inspect_model(write(tmp_path, "m.zip", as_zip(files)), workdir)
    assert result.details["task"] == "feature-extraction" and result.details["tokenizer"] is False
    assert [i.name for i in result.inputs] == ["input_ids", "attention_mask"]
    assert [(o.name, o.shape) for o in result.outputs] == [("last_hidden_state", ["batch", "sequence", 8])]


def test_sharded_weights_are_counted_from_every_shard(tmp_path: Path, workdir: Path) -> None:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    files = folder(
        {
            "model.safetensors": None,
            "model.safetensors.index.json": index,
            "model-00001-of-00002.safetensors": save({"a": np.ones((3, 4), np.float16)}),
            "model-00002-of-00002.safetensors": save({"b": np.ones(5, np.float32)}),
        }
    )
    result = inspect_model(write(tmp_path, "m.zip", as_zip(files)), workdir)
    assert result.parameters == 17 and len(result.details["weights_files"]) == 2


def test_pickled_weights_beside_safetensors_are_listed_as_ignored_and_never_read(tmp_path: Path, workdir: Path) -> None:
    canary = tmp_path / "canary"
    files = folder({"pytorch_model.bin": pickle.dumps(Canary(canary))})
    result = inspect_model(write(tmp_path, "m.zip", as_zip(files)), workdir)
    assert result.details["ignored_files"] == ["pytorch_model.bin"]
    assert not canary.exists()


def test_a_zip_with_config_and_onnx_is_an_onnx_upload(tmp_path: Path, workdir: Path) -> None:
    # Optimum's ONNX exports hold config.json and tokenizer files beside model.onnx.
    upload = make_zip([("config.json", json.dumps(CONFIG).encode()), ("model.onnx", digits_onnx_bytes())])
    assert inspect_model(write(tmp_path, "m.zip", upload), workdir).format == "onnx"


# ----------------------------------------------------------------------------------------------------- refusals

REFUSED = {
    "auto_map in config.json": ("remote_code_not_allowed", folder({"config.json": {**CONFIG, "auto_map": {"x": "y"}}})),
    "auto_map in a sub-config": (
        "remote_code_not_allowed",
        folder({"config.json": {**CONFIG, "text_config": {"auto_map": {"AutoModel": "m.M"}}}}),
    ),
    "auto_map in tokenizer_config.json": (
        "remote_code_not_allowed",
        folder({"tokenizer_config.json": {"auto_map": {"AutoTokenizer": ["t.T", None]}}}),
    ),
    "a python file": ("remote_code_not_allowed", folder({"modeling_custom.py": b"import os\nos.system('id')\n"})),
    "a python file in a subfolder": ("remote_code_not_allowed", folder({"code/run.py": b"print(1)\n"})),
    "only pytorch_model.bin": (
        "pickled_weights_not_accepted",
        folder({"model.safetensors": None, "pytorch_model.bin": b"x"}),
    ),
    "only a .ckpt": ("pickled_weights_not_accepted", folder({"model.safetensors": None, "weights.ckpt": b"x"})),
    "only tf weights": ("unsupported_format", folder({"model.safetensors": None, "tf_model.h5": b"x"})),
    "unsupported task": (
        "unsupported_model",
        folder({"config.json": {**CONFIG, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}}),
    ),
    "already quantized": ("unsupported_model", folder({"config.json": {**CONFIG, "quantization_config": {}}})),
    "no architectures": ("invalid_model", folder({"config.json": {"model_type": "bert"}})),
    "architecture that is no class name": (
        "invalid_model",
        folder({"config.json": {**CONFIG, "architectures": ["os.system('id')ForSequenceClassification"]}}),
    ),
    "config not json": ("invalid_model", folder({"config.json": b"{not json"})),
    "config a list": ("invalid_model", folder({"config.json": b"[1, 2]"})),
    "hostile safetensors header": ("invalid_safetensors", folder({"model.safetensors": b"\xff" * 8 + b"{}" * 8})),
    "index naming a shard outside": (
        "invalid_model",
        folder({"model.safetensors.index.json": {"weight_map": {"a": "../model.safetensors"}}}),
    ),
    "index naming a missing shard": (
        "invalid_model",
        folder({"model.safetensors.index.json": {"weight_map": {"a": "model-1.safetensors"}}}),
    ),
    "labels not numbered 0..n-1": ("invalid_model", folder({"config.json": {**CONFIG, "id2label": {"1": "a"}}})),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.parametrize("packaging", ["zip", "tar"])
def test_folders_that_could_run_code_or_cannot_load_are_refused(
    tmp_path: Path, workdir: Path, case: str, packaging: str
) -> None:
    code, files = REFUSED[case]
    data = as_zip(files) if packaging == "zip" else as_tar(files)
    err = refused(code, lambda: inspect_model(write(tmp_path, "upload", data), workdir))
    if code == "remote_code_not_allowed":
        assert "trust_remote_code=False" in err.message
    if code == "pickled_weights_not_accepted":
        assert "safe_serialization=True" in err.message
    assert not any(workdir.iterdir())


def _member(name: str, kind: bytes, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


HOSTILE_TARS = {
    "symlink": [_member("link", tarfile.SYMTYPE, linkname="/etc/passwd")],
    "symlink to a sibling": [_member("vocab2.txt", tarfile.SYMTYPE, linkname="vocab.txt")],
    "hard link": [_member("hard", tarfile.LNKTYPE, linkname="/etc/passwd")],
    "character device": [_member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "fifo": [_member("fifo", tarfile.FIFOTYPE)],
    "parent traversal": [_member("../escaped.txt", tarfile.REGTYPE)],
    "absolute path": [_member("/tmp/squeeze-absolute-owned", tarfile.REGTYPE)],
    "duplicate": [_member("vocab.txt", tarfile.REGTYPE)],
    "file used as a folder": [_member("vocab.txt/x", tarfile.REGTYPE)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tars_are_refused_before_writing(tmp_path: Path, workdir: Path, case: str) -> None:
    upload = write(tmp_path, "upload.tar", as_tar(folder(), extra=HOSTILE_TARS[case]))
    before = tree(tmp_path)
    refused("unsafe_archive", lambda: inspect_model(upload, workdir))
    refused("unsafe_archive", lambda: safe_extract_archive(upload, workdir))
    assert tree(tmp_path) == before and not any(workdir.iterdir())
    assert not Path("/tmp/squeeze-absolute-owned").exists()


def test_truncated_and_compressed_tars_are_refused(tmp_path: Path, workdir: Path) -> None:
    data = as_tar(folder())  # config.json's data at 512-729, model.safetensors' at 1536-2168
    refused("invalid_archive", lambda: inspect_model(write(tmp_path, "t.tar", data[:2000]), workdir))
    refused("invalid_archive", lambda: safe_extract_archive(write(tmp_path, "t2.tar", data[:700]), workdir))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("config.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    refused(
        {"invalid_model", "unsupported_format"},
        lambda: inspect_model(write(tmp_path, "g.tgz", buf.getvalue()), workdir),
    )
    assert not any(workdir.iterdir())


def test_tar_member_limit(tmp_path: Path, workdir: Path) -> None:
    files = {**folder(), **{f"extra/{i}.txt": b"" for i in range(30)}}
    upload = write(tmp_path, "m.tar", as_tar(files))
    refused("archive_too_large", lambda: inspect_model(upload, workdir, max_members=20))
    refused("archive_too_large", lambda: inspect_model(upload, workdir, max_total_bytes=100))


def test_safe_extract_archive_writes_a_tar_faithfully(tmp_path: Path, workdir: Path) -> None:
    files = folder()
    written = safe_extract_archive(write(tmp_path, "m.tar", as_tar(files, "root/")), workdir)
    assert sorted(p.relative_to(workdir).as_posix() for p in written) == sorted(f"root/{n}" for n in files)
    assert all((workdir / "root" / n).read_bytes() == data for n, data in files.items())


# ----------------------------------------------------------------------------------------------------- JSONL

GOOD_JSONL = b'{"text": "a b", "label": 1}\n\n{"text": "c", "label": 0}\r\n{"text": "", "label": 1}'


def test_jsonl_dataset_is_inspected(tmp_path: Path) -> None:
    result = inspect_dataset(write(tmp_path, "d.jsonl", b"\xef\xbb\xbf" + GOOD_JSONL))
    assert (result.num_samples, result.has_labels) == (3, True)
    assert result.arrays["text"].dtype == "text" and result.arrays["labels"].values == [0, 1]
    pairs = inspect_dataset(write(tmp_path, "p.jsonl", b'{"text": "a", "text_pair": "b"}\n'))
    assert set(pairs.arrays) == {"text", "text_pair"} and not pairs.has_labels
    names = inspect_dataset(write(tmp_path, "n.jsonl", b'{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}'))
    assert names.arrays["labels"].dtype == "text" and names.arrays["labels"].values == ["neg", "pos"]


BAD_JSONL = {
    "not json": (b'{"text": "a"}\n{"text": "b"\n', 2),
    "not an object": (b'{"text": "a"}\n["text", "b"]\n', 2),
    "no text": (b'{"text": "a"}\n{"label": 1}\n', 2),
    "text not a string": (b'{"text": 3}\n', 1),
    "unknown key": (b'{"text": "a", "labels": 1}\n', 1),
    "negative label": (b'{"text": "a", "label": -1}\n', 1),
    "boolean label": (b'{"text": "a", "label": true}\n', 1),
    "float label": (b'{"text": "a", "label": 1.5}\n', 1),
    "label missing later": (b'{"text": "a", "label": 1}\n{"text": "b"}\n', 2),
    "label types mixed": (b'{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n', 2),
    "not utf-8": (b'{"text": "a"}\n{"text": "\xff"}\n', 2),
    "deep nesting": (b'{"text": "a", "label": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", 1),
    "line too long": (b'{"text": "a"}\n{"text": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n', 2),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_lines_are_refused_with_their_number(tmp_path: Path, case: str) -> None:
    data, line = BAD_JSONL[case]
    err = refused("invalid_dataset", lambda: inspect_dataset(write(tmp_path, "d.jsonl", data)))
    assert err.details["line"] == line and err.message.startswith(f"line {line}:")


def test_empty_jsonl_is_refused(tmp_path: Path) -> None:
    refused("invalid_dataset", lambda: inspect_dataset(write(tmp_path, "d.jsonl", b"{\n")))
    refused("invalid_dataset", lambda: inspect_dataset(write(tmp_path, "e.jsonl", b"  \n\n")))


def _models(tmp_path: Path, workdir: Path) -> dict[str, object]:
    base = {**CONFIG, "architectures": ["BertModel"]}
    return {
        "classifier": inspect_model(write(tmp_path, "c.zip", as_zip(folder())), workdir),
        "no tokenizer": inspect_model(
            write(tmp_path, "n.zip", as_zip(folder({"vocab.txt": None, "tokenizer_config.json": None}))), workdir
        ),
        "base": inspect_model(write(tmp_path, "b.zip", as_zip(folder({"config.json": base}))), workdir),
        "onnx": inspect_model(write(tmp_path, "m.onnx", digits_onnx_bytes()), workdir),
    }


def test_jsonl_datasets_match_hf_models_with_a_tokenizer(tmp_path: Path, workdir: Path) -> None:
    models = _models(tmp_path, workdir)
    labelled = inspect_dataset(write(tmp_path, "d.jsonl", GOOD_JSONL))
    named = inspect_dataset(write(tmp_path, "n.jsonl", b'{"text": "a", "label": "pos"}\n'))
    unlabelled = inspect_dataset(write(tmp_path, "u.jsonl", b'{"text": "a", "text_pair": "b"}\n'))
    assert check_dataset_for_model(models["classifier"], labelled) == {"text": "text"}
    assert check_dataset_for_model(models["classifier"], named) == {"text": "text"}
    assert check_dataset_for_model(models["base"], unlabelled) == {"text": "text", "text_pair": "text_pair"}

    def mismatch(model: str, dataset: DatasetInspection, words: str) -> None:
        with pytest.raises(InvalidUpload) as info:
            check_dataset_for_model(models[model], dataset)  # type: ignore[arg-type]
        assert info.value.code == "dataset_mismatch" and words in info.value.message

    mismatch("onnx", labelled, "Tokenize the texts yourself")
    mismatch("no tokenizer", labelled, "no tokenizer files")
    mismatch("base", labelled, "only a sequence classifier")
    out_of_range = inspect_dataset(write(tmp_path, "o.jsonl", b'{"text": "a", "label": 2}\n'))
    mismatch("classifier", out_of_range, "outside the model's 2 classes")
    unknown = inspect_dataset(write(tmp_path, "k.jsonl", b'{"text": "a", "label": "maybe"}\n'))
    mismatch("classifier", unknown, "'maybe'")


def test_npz_token_arrays_may_leave_out_optional_inputs(tmp_path: Path, workdir: Path) -> None:
    model = _models(tmp_path, workdir)["classifier"]
    buf = io.BytesIO()
    np.savez(buf, input_ids=np.ones((4, 7), np.int64), labels=np.zeros(4, np.int64))
    dataset = inspect_dataset(write(tmp_path, "t.npz", buf.getvalue()))
    assert check_dataset_for_model(model, dataset) == {"input_ids": "input_ids"}  # type: ignore[arg-type]
    np.savez(buf := io.BytesIO(), attention_mask=np.ones((4, 7), np.int64))
    with pytest.raises(InvalidUpload, match="input_ids"):
        check_dataset_for_model(model, inspect_dataset(write(tmp_path, "m.npz", buf.getvalue())))  # type: ignore[arg-type]


def test_hf_inspection_never_imports_torch_or_transformers(tmp_path: Path) -> None:
    write(tmp_path, "m.tar", as_tar(folder()))
    write(tmp_path, "d.jsonl", GOOD_JSONL)
    code = (
        "import sys, pathlib, tempfile; from app.inspection import inspect_model, inspect_dataset; "
        f"d = pathlib.Path({str(tmp_path)!r}); w = pathlib.Path(tempfile.mkdtemp()); "
        "inspect_model(d / 'm.tar', w); inspect_dataset(d / 'd.jsonl'); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
