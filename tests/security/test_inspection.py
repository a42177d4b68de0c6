"""Hostile uploads against ``app.inspection``: real files, built here, nothing mocked.

Every refusal must be an ``InvalidUpload`` with a stable code, must not run uploaded code (canary files), and must
not write outside the work folder it was given.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.errors import InvalidUpload
from app.inspection import (
    DatasetInspection,
    ModelInspection,
    check_dataset_for_model,
    find_onnx_in_dir,
    inspect_dataset,
    inspect_model,
    safe_extract_zip,
)
from app.inspection.pt2_strings import check_guard_code, check_sym_expr
from tests.support.models import (
    ROOT,
    digits_npz_bytes,
    digits_onnx_bytes,
    digits_pt2_bytes,
    trained_digits_cnn,
)

# ----------------------------------------------------------------------------------------------------- helpers


class Canary:
    """Unpickling this writes ``path``: proof, if the file ever appears, that an upload was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def refused(code: str | set[str], fn: Callable[[], object]) -> InvalidUpload:
    with pytest.raises(InvalidUpload) as info:
        fn()
    codes = {code} if isinstance(code, str) else code
    assert info.value.code in codes, f"{info.value.code}: {info.value.message}"
    assert info.value.status_code == 422
    assert info.value.message
    return info.value


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we write on purpose
        with zipfile.ZipFile(buf, "w", compression) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def expected_parameters() -> int:
    return sum(p.numel() for p in trained_digits_cnn().parameters())


def external_data_model(tmp_path: Path, location: str = "weights.bin") -> tuple[bytes, bytes]:
    """The digits model saved with its weights in an external file: (.onnx bytes, data-file bytes)."""
    src = tmp_path / "external_src"
    (src / location).parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load_model_from_string(digits_onnx_bytes())
    onnx.save_model(
        model,
        src / "digits.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return (src / "digits.onnx").read_bytes(), (src / location).read_bytes()


def with_locations(onnx_bytes: bytes, location: str) -> bytes:
    """The same model with every external-data location rewritten to ``location``."""
    model = onnx.load_model_from_string(onnx_bytes)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return model.SerializeToString()


# ----------------------------------------------------------------------------------------------------- good models


def test_digits_onnx_is_inspected(tmp_path: Path, workdir: Path) -> None:
    result = inspect_model(write(tmp_path, "upload", digits_onnx_bytes()), workdir)
    assert isinstance(result, ModelInspection)
    assert (result.format, result.packaging) == ("onnx", "file")
    assert [(i.name, i.shape, i.dtype) for i in result.inputs] == [("input", ["batch", 1, 8, 8], "float32")]
    assert [(o.name, o.shape, o.dtype) for o in result.outputs] == [("logits", ["batch", 10], "float32")]
    assert result.parameters == expected_parameters()
    assert isinstance(result.opset, int) and result.opset >= 13
    assert result.details["producer_name"] == "pytorch"
    assert result.details["external_data_files"] == []
    assert not any(workdir.iterdir())


def test_digits_pt2_is_inspected(tmp_path: Path, workdir: Path) -> None:
    result = inspect_model(write(tmp_path, "upload.bin", digits_pt2_bytes()), workdir)
    assert (result.format, result.packaging) == ("pt2", "file")
    (spec,) = result.inputs
    assert (spec.name, spec.shape[1:], spec.dtype) == ("input", [1, 8, 8], "float32")
    assert isinstance(spec.shape[0], str)  # the dynamic batch dimension
    (out,) = result.outputs
    assert (out.shape[1:], out.dtype) == ([10], "float32") and out.shape[0] == spec.shape[0]
    assert result.parameters == expected_parameters()
    assert result.opset is None
    assert result.details["torch_version"].startswith("2.")
    assert result.details["dynamic_dims"][spec.shape[0]]["min"] == 1
    assert not any(workdir.iterdir())  # a .pt2 is read in place, never extracted


def test_format_comes_from_content_not_name(tmp_path: Path, workdir: Path) -> None:
    assert inspect_model(write(tmp_path, "model.pt2", digits_onnx_bytes()), workdir).format == "onnx"
    assert inspect_model(write(tmp_path, "model.onnx", digits_pt2_bytes()), workdir).format == "pt2"


def test_zip_of_onnx_with_external_data_is_inspected(tmp_path: Path, workdir: Path) -> None:
    model_bytes, data = external_data_model(tmp_path)
    upload = write(tmp_path, "upload.zip", make_zip([("digits.onnx", model_bytes), ("weights.bin", data)]))
    result = inspect_model(upload, workdir)
    assert (result.format, result.packaging) == ("onnx", "zip")
    assert result.inputs[0].name == "input" and result.inputs[0].shape == ["batch", 1, 8, 8]
    assert result.parameters == expected_parameters()
    assert result.details["external_data_files"] == ["weights.bin"]
    assert result.details["onnx_path"] == "digits.onnx"
    assert tree(workdir) == {"digits.onnx", "weights.bin"}
    assert find_onnx_in_dir(workdir) == workdir / "digits.onnx"


def test_zip_with_model_in_a_subfolder_is_inspected(tmp_path: Path, workdir: Path) -> None:
    model_bytes, data = external_data_model(tmp_path, location="data/w.bin")
    entries = [("m/", b""), ("m/digits.onnx", model_bytes), ("m/data/w.bin", data)]
    upload = write(tmp_path, "upload.zip", make_zip(entries, zipfile.ZIP_DEFLATED))
    result = inspect_model(upload, workdir)
    assert result.details["onnx_path"] == "m/digits.onnx"
    assert result.details["external_data_files"] == ["data/w.bin"]


def test_safe_extract_zip_returns_the_files_it_wrote(tmp_path: Path, workdir: Path) -> None:
    src = write(tmp_path, "a.zip", make_zip([("a/b.txt", b"hello"), ("c.txt", b"x" * 10)]))
    written = safe_extract_zip(src, workdir, max_members=10, max_total_bytes=1000, max_ratio=200)
    assert sorted(p.relative_to(workdir).as_posix() for p in written) == ["a/b.txt", "c.txt"]
    assert (workdir / "a" / "b.txt").read_bytes() == b"hello"


# ----------------------------------------------------------------------------------------------------- bad files


def test_garbage_is_refused(tmp_path: Path, workdir: Path) -> None:
    rng = np.random.default_rng(0)
    for i, data in enumerate(
        [b"this is not a model\n" * 50, b"\x08" + rng.bytes(4096), b"\x93NUMPY" + rng.bytes(100), b"{}"]
    ):
        err = refused(
            {"invalid_model", "unsupported_format"},
            lambda d=data, i=i: inspect_model(write(tmp_path, f"g{i}", d), workdir),
        )
        assert "onnx" in err.message.lower()


def test_empty_file_is_refused(tmp_path: Path, workdir: Path) -> None:
    err = refused("invalid_model", lambda: inspect_model(write(tmp_path, "empty.onnx", b""), workdir))
    assert "empty" in err.message


def test_truncated_onnx_is_refused(tmp_path: Path, workdir: Path) -> None:
    data = digits_onnx_bytes()
    refused("invalid_model", lambda: inspect_model(write(tmp_path, "half.onnx", data[: len(data) // 2]), workdir))


def test_empty_and_unrelated_zips_are_refused(tmp_path: Path, workdir: Path) -> None:
    refused("invalid_archive", lambda: inspect_model(write(tmp_path, "e.zip", make_zip([])), workdir))
    err = refused(
        "unsupported_format", lambda: inspect_model(write(tmp_path, "u.zip", make_zip([("a.txt", b"hi")])), workdir)
    )
    assert ".pt2" in err.message and ".onnx" in err.message
    npz = write(tmp_path, "d.npz", digits_npz_bytes(n=4))
    refused("unsupported_format", lambda: inspect_model(npz, workdir))
    two = make_zip([("a.onnx", digits_onnx_bytes()), ("b.onnx", digits_onnx_bytes())])
    refused("invalid_archive", lambda: inspect_model(write(tmp_path, "two.zip", two), workdir))
    corrupt = bytearray(make_zip([("m.onnx", digits_onnx_bytes())], zipfile.ZIP_DEFLATED))
    corrupt[200:400] = bytes(200)
    refused("invalid_archive", lambda: inspect_model(write(tmp_path, "c.zip", bytes(corrupt)), workdir))
    assert not any(workdir.iterdir())


# ----------------------------------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name", ["model.onnx", "model.pt", "model.pt2"])
def test_pickles_are_refused_without_being_loaded(tmp_path: Path, workdir: Path, protocol: int, name: str) -> None:
    canary = tmp_path / "canary"
    upload = write(tmp_path, name, pickle.dumps(Canary(canary), protocol=protocol))
    err = refused("pickle_not_accepted", lambda: inspect_model(upload, workdir))
    assert "torch.export" in err.message and "ONNX" in err.message
    assert not canary.exists()


def test_canary_pickle_is_live(tmp_path: Path) -> None:
    """The fixture above really would run code if unpickled (done here in a throwaway process)."""
    canary = tmp_path / "proof"
    payload = write(tmp_path, "p.pkl", pickle.dumps(Canary(canary)))
    code = f"import pickle; pickle.loads(open({str(payload)!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert canary.read_text() == "pwned"


def test_torch_save_checkpoints_are_refused(tmp_path: Path, workdir: Path) -> None:
    import torch

    canary = tmp_path / "canary"
    for i, obj in enumerate([trained_digits_cnn().state_dict(), trained_digits_cnn(), {"x": Canary(canary)}]):
        buf = io.BytesIO()
        torch.save(obj, buf)
        upload = write(tmp_path, f"ckpt{i}.onnx", buf.getvalue())
        refused("pickle_not_accepted", lambda u=upload: inspect_model(u, workdir))
    assert not canary.exists()
    assert not any(workdir.iterdir())


# ----------------------------------------------------------------------------------------------------- archives


def _symlink(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


HOSTILE_ARCHIVES: dict[str, tuple[str, list[tuple[str | zipfile.ZipInfo, bytes]]]] = {
    "parent_traversal": ("unsafe_archive", [("../x", b"owned")]),
    "nested_traversal": ("unsafe_archive", [("a/../../x", b"owned")]),
    "absolute": ("unsafe_archive", [("/tmp/squeeze-absolute-owned", b"owned")]),
    "backslash": ("unsafe_archive", [("..\\x", b"owned")]),
    "drive_letter": ("unsafe_archive", [("C:/x", b"owned")]),
    "symlink": ("unsafe_archive", [(_symlink("link", "../../etc/passwd"), b"../../etc/passwd")]),
    "symlink_dir": ("unsafe_archive", [(_symlink("d/", ".."), b".."), ("d/x", b"owned")]),
    "duplicate": ("unsafe_archive", [("w.bin", b"a"), ("w.bin", b"b")]),
    "duplicate_after_normalising": ("unsafe_archive", [("w.bin", b"a"), ("./w.bin", b"b")]),
    "duplicate_case": ("unsafe_archive", [("W.bin", b"a"), ("w.bin", b"b")]),
    "file_and_folder": ("unsafe_archive", [("w", b"a"), ("w/x", b"b")]),
    "too_many_members": ("archive_too_large", [(f"f{i}", b"") for i in range(1001)]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARCHIVES))
def test_hostile_archives_are_refused_before_writing(tmp_path: Path, workdir: Path, case: str) -> None:
    code, entries = HOSTILE_ARCHIVES[case]
    upload = write(tmp_path, "upload.zip", make_zip([("model.onnx", digits_onnx_bytes()), *entries]))
    before = tree(tmp_path)
    refused(code, lambda: inspect_model(upload, workdir))
    refused(code, lambda: safe_extract_zip(upload, workdir))
    assert tree(tmp_path) == before
    assert not any(workdir.iterdir())
    assert not Path("/tmp/squeeze-absolute-owned").exists()


def test_zip_bomb_is_refused(tmp_path: Path, workdir: Path) -> None:
    bomb = make_zip([("model.onnx", digits_onnx_bytes()), ("w.bin", bytes(64 * 1024**2))], zipfile.ZIP_DEFLATED)
    assert len(bomb) < 1024**2
    upload = write(tmp_path, "bomb.zip", bomb)
    before = tree(tmp_path)
    err = refused("unsafe_archive", lambda: inspect_model(upload, workdir))
    assert err.details["reason"] == "compression_ratio"
    refused("unsafe_archive", lambda: safe_extract_zip(upload, workdir, max_ratio=200))
    assert tree(tmp_path) == before and not any(workdir.iterdir())


def test_archive_total_size_limit(tmp_path: Path, workdir: Path) -> None:
    upload = write(tmp_path, "big.zip", make_zip([("model.onnx", digits_onnx_bytes())]))
    refused("archive_too_large", lambda: inspect_model(upload, workdir, max_total_bytes=10_000))
    refused("archive_too_large", lambda: safe_extract_zip(upload, workdir, max_total_bytes=10_000))
    assert not any(workdir.iterdir())


def test_member_larger_than_declared_is_stopped(tmp_path: Path, workdir: Path) -> None:
    """A central directory that understates a member's size: extraction stops, nothing stays behind."""
    data = bytearray(make_zip([("w.bin", b"A" * 5000)]))
    # Patch the uncompressed size (offset 24 in the central directory entry) from 5000 down to 100.
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (100).to_bytes(4, "little")
    upload = write(tmp_path, "liar.zip", bytes(data))
    refused({"unsafe_archive", "invalid_archive"}, lambda: safe_extract_zip(upload, workdir))
    assert not any(workdir.iterdir())


def test_nul_in_member_name_is_refused(tmp_path: Path, workdir: Path) -> None:
    data = make_zip([("model.onnx", digits_onnx_bytes()), ("evilXname", b"x")]).replace(b"evilXname", b"evil\x00name")
    upload = write(tmp_path, "nul.zip", data)
    refused({"unsafe_archive", "invalid_archive"}, lambda: inspect_model(upload, workdir))
    assert not any(workdir.iterdir())


def test_overlapping_members_are_refused(tmp_path: Path, workdir: Path) -> None:
    """Two central-directory entries sharing one stretch of data: the overlapping-entry zip bomb."""
    data = bytearray(make_zip([("a.bin", b"A" * 1000), ("b.bin", b"B" * 10)]))
    cd_b = data.rfind(b"PK\x01\x02")
    data[cd_b + 42 : cd_b + 46] = (0).to_bytes(4, "little")  # b's local header offset := a's
    upload = write(tmp_path, "overlap.zip", bytes(data))
    err = refused("unsafe_archive", lambda: safe_extract_zip(upload, workdir))
    assert err.details["reason"] == "overlap"
    assert not any(workdir.iterdir())


def test_extraction_needs_an_empty_folder(tmp_path: Path, workdir: Path) -> None:
    (workdir / "already").write_text("x")
    src = write(tmp_path, "a.zip", make_zip([("a.txt", b"a")]))
    with pytest.raises(ValueError):
        safe_extract_zip(src, workdir)


# ----------------------------------------------------------------------------------------------------- external data


def test_single_onnx_with_external_data_is_refused(tmp_path: Path, workdir: Path) -> None:
    model_bytes, _ = external_data_model(tmp_path)
    err = refused("external_data_missing", lambda: inspect_model(write(tmp_path, "m.onnx", model_bytes), workdir))
    assert ".zip" in err.message


def test_zip_missing_its_external_data_is_refused(tmp_path: Path, workdir: Path) -> None:
    model_bytes, _ = external_data_model(tmp_path)
    upload = write(tmp_path, "u.zip", make_zip([("digits.onnx", model_bytes)]))
    refused("external_data_missing", lambda: inspect_model(upload, workdir))


def test_truncated_external_data_is_refused(tmp_path: Path, workdir: Path) -> None:
    model_bytes, data = external_data_model(tmp_path)
    upload = write(tmp_path, "u.zip", make_zip([("digits.onnx", model_bytes), ("weights.bin", data[:100])]))
    refused("external_data_out_of_range", lambda: inspect_model(upload, workdir))


@pytest.mark.parametrize(
    "location",
    ["../secret", "/etc/passwd", "..\\secret", "sub/../../secret", "../work_evil/weights.bin", "C:/secret"],
)
def test_external_data_outside_the_model_is_refused(tmp_path: Path, workdir: Path, location: str) -> None:
    model_bytes, data = external_data_model(tmp_path)
    # Make every target exist, so only the location check can stop it.
    (tmp_path / "secret").write_bytes(data)
    (tmp_path / "work_evil").mkdir()
    (tmp_path / "work_evil" / "weights.bin").write_bytes(data)
    hostile = with_locations(model_bytes, location)
    upload = write(tmp_path, "u.zip", make_zip([("digits.onnx", hostile), ("weights.bin", data)]))
    before = tree(tmp_path)
    err = refused("external_data_outside_model", lambda: inspect_model(upload, workdir))
    assert err.details["location"] == location
    assert tree(tmp_path) == before and not any(workdir.iterdir())
    # The same model uploaded alone is refused for the same reason.
    single = write(tmp_path, "single.onnx", hostile)
    refused("external_data_outside_model", lambda: inspect_model(single, tmp_path / "work2"))


# ----------------------------------------------------------------------------------------------------- ONNX content


def _tiny_model(domain: str, op: str) -> bytes:
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node(op, ["h"], ["y"], domain=domain)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def test_custom_operator_domain_is_refused(tmp_path: Path, workdir: Path) -> None:
    err = refused(
        "unsupported_operator_domain",
        lambda: inspect_model(write(tmp_path, "c.onnx", _tiny_model("evil.ops", "Pwn")), workdir),
    )
    assert "evil.ops::Pwn" in err.message


def test_allowed_domains_pass(tmp_path: Path, workdir: Path) -> None:
    result = inspect_model(write(tmp_path, "ok.onnx", _tiny_model("", "Sigmoid")), workdir)
    assert result.inputs[0].shape == ["n", 4] and result.parameters == 0
    for domain, op in [("com.microsoft", "Gelu"), ("ai.onnx.ml", "Normalizer")]:
        result = inspect_model(write(tmp_path, f"{domain}.onnx", _tiny_model(domain, op)), workdir)
        assert result.details["opset_imports"][domain] == 1


def test_graph_without_nodes_is_refused(tmp_path: Path, workdir: Path) -> None:
    graph = helper.make_graph([], "g", [], [])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    refused("invalid_model", lambda: inspect_model(write(tmp_path, "n.onnx", data), workdir))


# ----------------------------------------------------------------------------------------------------- pt2 content


def _pt2_members() -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(digits_pt2_bytes())) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _pt2_with(tmp_path: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    members = _pt2_members()
    edit(members)
    return write(tmp_path, "edited.pt2", make_zip(list(members.items())))


def _edit_json(members: dict[str, bytes], name: str, edit: Callable[[dict], None]) -> None:
    doc = json.loads(members[name])
    edit(doc)
    members[name] = json.dumps(doc).encode()


MODEL_JSON = "archive/models/model.json"
WEIGHTS_JSON = "archive/data/weights/model_weights_config.json"


def test_repacked_pt2_still_passes(tmp_path: Path, workdir: Path) -> None:
    assert inspect_model(_pt2_with(tmp_path, lambda m: None), workdir).parameters == expected_parameters()


def test_pt2_shape_expression_code_is_refused(tmp_path: Path, workdir: Path) -> None:
    """torch.export.load hands these strings to sympy.sympify, i.e. eval."""
    canary = tmp_path / "canary"

    def edit(doc: dict) -> None:
        size = doc["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0]
        size["as_expr"]["expr_str"] = f"__import__('os').system('touch {canary}')"

    upload = _pt2_with(tmp_path, lambda m: _edit_json(m, MODEL_JSON, edit))
    refused("unsafe_model", lambda: inspect_model(upload, workdir))
    assert not canary.exists()


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("builtins.eval", "unsafe_model"),
        ("torch.load", "unsafe_model"),
        ("torch.ops.aten.from_file.default", "unsafe_model"),
        ("torch.ops.mylib.custom.default", "unsupported_operator_domain"),
    ],
)
def test_pt2_call_targets_are_allow_listed(tmp_path: Path, workdir: Path, target: str, code: str) -> None:
    def edit(doc: dict) -> None:
        doc["graph_module"]["graph"]["nodes"][0]["target"] = target

    refused(code, lambda: inspect_model(_pt2_with(tmp_path, lambda m: _edit_json(m, MODEL_JSON, edit)), workdir))


GOOD_GUARDS = ["L['input'].size()[1] == 1", "2 <= L['input'].size()[0]", "L['input'].stride()[0] % 2 == 0"]
BAD_GUARDS = [
    "__import__('os').system('true')",
    "L['input'].size.__globals__",
    "L['__class__']",
    "(lambda: 1)()",
    "L['input'].to('cpu') is None",
    "[x for x in ()]",
    "open('/etc/passwd')",
]


def test_pt2_plain_guard_code_passes(tmp_path: Path, workdir: Path) -> None:
    upload = _pt2_with(tmp_path, lambda m: _edit_json(m, MODEL_JSON, lambda d: d.update(guards_code=GOOD_GUARDS)))
    assert inspect_model(upload, workdir).format == "pt2"


@pytest.mark.parametrize("guard", BAD_GUARDS)
def test_pt2_guard_code_beyond_size_checks_is_refused(tmp_path: Path, workdir: Path, guard: str) -> None:
    """ExportedProgram.module() compiles guards_code into Python and runs it."""
    upload = _pt2_with(tmp_path, lambda m: _edit_json(m, MODEL_JSON, lambda d: d.update(guards_code=[guard])))
    refused("unsafe_model", lambda: inspect_model(upload, workdir))
    with pytest.raises(InvalidUpload):
        check_guard_code(guard)


@pytest.mark.parametrize(
    "expr",
    [
        "Symbol('s31', positive=True, integer=True)",
        "Mul(Integer(12), Pow(Symbol('s53', positive=True, integer=True), Integer(2)))",
        "Add(Mul(Integer(224), Symbol('s39', positive=True, integer=True)), Integer(-224))",
        "FloorDiv(s0, 2) + 1",
        "Eq(Mod(s0, 2), 0)",
        "s0**2 - 1",
    ],
)
def test_symbolic_shapes_torch_writes_pass(expr: str) -> None:
    check_sym_expr(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "Symbol('__import__')",
        "Symbol('s1').__class__",
        "().__class__.__bases__",
        "eval('1')",
        "lambda: 1",
        "Pow(Integer(10), Pow(Integer(10), Integer(10)))",
        "Integer(10)**Integer(10)**Integer(10)",
        "s0**s1",
        "Integer(99999999999999999999)",
        "s0 ^ 2",
        "[s0][0]",
        "Symbol('s1', evaluate=__import__('os'))",
    ],
)
def test_symbolic_shapes_beyond_arithmetic_are_refused(expr: str) -> None:
    err = refused("unsafe_model", lambda: check_sym_expr(expr))
    assert err.details["expression"] == expr[:200]


def test_pt2_pickled_weights_are_refused(tmp_path: Path, workdir: Path) -> None:
    def edit(doc: dict) -> None:
        doc["config"]["0.weight"]["use_pickle"] = True

    upload = _pt2_with(tmp_path, lambda m: _edit_json(m, WEIGHTS_JSON, edit))
    refused("pickle_not_accepted", lambda: inspect_model(upload, workdir))
    legacy = _pt2_with(tmp_path, lambda m: m.update({"archive/data/weights/model.pt": pickle.dumps({})}))
    refused("pickle_not_accepted", lambda: inspect_model(legacy, workdir))


def test_pt2_sample_inputs_with_code_are_refused(tmp_path: Path, workdir: Path) -> None:
    """torch.export.load falls back to a full unpickle of sample inputs; only tensor pickles get through."""
    import torch

    canary = tmp_path / "canary"
    buf = io.BytesIO()
    torch.save(((Canary(canary),), {}), buf)
    upload = _pt2_with(tmp_path, lambda m: m.update({"archive/data/sample_inputs/model.pt": buf.getvalue()}))
    err = refused("pickle_not_accepted", lambda: inspect_model(upload, workdir))
    assert "exec" in err.message and "exec" in str(err.details["imports"])
    assert not canary.exists()


def test_pt2_json_that_is_not_understood_is_refused(tmp_path: Path, workdir: Path) -> None:
    for payload in [b"not json", b"[]", json.dumps({"graph_module": {}}).encode(), b"[" * 100_000]:
        upload = _pt2_with(tmp_path, lambda m, p=payload: m.update({MODEL_JSON: p}))
        refused("invalid_model", lambda u=upload: inspect_model(u, workdir))


def test_pt2_traversal_member_is_refused(tmp_path: Path, workdir: Path) -> None:
    upload = _pt2_with(tmp_path, lambda m: m.update({"archive/../../x": b"owned"}))
    refused("unsafe_archive", lambda: inspect_model(upload, workdir))


# ----------------------------------------------------------------------------------------------------- datasets


def npz(folder: Path, name: str = "d.npz", **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write(folder, name, buf.getvalue())


def test_digits_npz_is_inspected(tmp_path: Path) -> None:
    result = inspect_dataset(write(tmp_path, "d.npz", digits_npz_bytes()))
    assert isinstance(result, DatasetInspection)
    assert result.num_samples == 397 and result.has_labels
    assert result.arrays["input"].shape == [397, 1, 8, 8] and result.arrays["input"].dtype == "float32"
    assert result.arrays["labels"].shape == [397] and result.arrays["labels"].dtype == "int64"
    unlabelled = inspect_dataset(write(tmp_path, "u.npz", digits_npz_bytes(labels=False, n=5)))
    assert (unlabelled.num_samples, unlabelled.has_labels) == (5, False)


def test_compressed_npz_is_inspected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, inputs=np.zeros((3, 1, 8, 8), np.float32), labels=np.arange(3))
    assert inspect_dataset(write(tmp_path, "c.npz", buf.getvalue())).num_samples == 3


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = npz(tmp_path, x=np.array([Canary(canary), 1], dtype=object), labels=np.array([0, 1]))
    err = refused("object_arrays_not_allowed", lambda: inspect_dataset(path))
    assert "'x'" in err.message
    assert not canary.exists()


def test_mismatched_sample_counts_are_refused(tmp_path: Path) -> None:
    path = npz(tmp_path, input=np.zeros((10, 4), np.float32), labels=np.zeros(9, np.int64))
    err = refused("invalid_dataset", lambda: inspect_dataset(path))
    assert "'input': 10" in err.message and "'labels': 9" in err.message


@pytest.mark.parametrize(
    "labels", [np.zeros(4, np.float32), np.zeros((4, 2), np.int64), np.array(["a", "b", "c", "d"])]
)
def test_bad_labels_are_refused(tmp_path: Path, labels: np.ndarray) -> None:
    path = npz(tmp_path, input=np.zeros((4, 3), np.float32), labels=labels)
    err = refused("invalid_dataset", lambda: inspect_dataset(path))
    assert "labels" in err.message


def test_bad_dataset_files_are_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    good = digits_npz_bytes(n=20)
    cases = {
        "empty": (b"", "invalid_dataset"),
        "garbage": (b"hello world" * 20, "invalid_dataset"),
        "npy": (b"\x93NUMPY\x01\x00" + b"x" * 100, "invalid_dataset"),
        "pickle": (pickle.dumps(Canary(canary)), "pickle_not_accepted"),
        "truncated": (good[: len(good) // 2], "invalid_dataset"),
        "strings": (None, "invalid_dataset"),
        "scalar": (None, "invalid_dataset"),
        "non_npy_member": (make_zip([("input.npy", b""), ("notes.txt", b"hi")]), "invalid_dataset"),
        "traversal": (make_zip([("../input.npy", b"")]), "unsafe_archive"),
        "too_many": (make_zip([(f"a{i}.npy", b"") for i in range(257)]), "archive_too_large"),
        "only_labels": (None, "invalid_dataset"),
        "no_samples": (None, "invalid_dataset"),
    }
    for name, (data, code) in cases.items():
        if name == "strings":
            path = npz(tmp_path, f"{name}.npz", input=np.array(["a", "b"]))
        elif name == "scalar":
            path = npz(tmp_path, f"{name}.npz", input=np.float32(1.0))
        elif name == "only_labels":
            path = npz(tmp_path, f"{name}.npz", labels=np.arange(3))
        elif name == "no_samples":
            path = npz(tmp_path, f"{name}.npz", input=np.zeros((0, 3), np.float32))
        else:
            path = write(tmp_path, f"{name}.npz", data)
        refused(code, lambda p=path: inspect_dataset(p))
    assert not canary.exists()


def test_npz_header_lying_about_its_size_is_refused(tmp_path: Path) -> None:
    """A header claiming a huge shape over a few bytes of data: caught from the header and the byte count."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 8)})
    path = write(
        tmp_path, "lie.npz", make_zip([("input.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"x" * 64)])
    )
    refused("invalid_dataset", lambda: inspect_dataset(path))


# ----------------------------------------------------------------------------------------------------- dataset vs model


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelInspection]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "onnx": inspect_model(write(folder, "m.onnx", digits_onnx_bytes()), folder / "w1"),
        "pt2": inspect_model(write(folder, "m.pt2", digits_pt2_bytes()), folder / "w2"),
    }


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_dataset_matches_model(tmp_path: Path, digits_models: dict[str, ModelInspection], fmt: str) -> None:
    model = digits_models[fmt]
    for name in ("input", "inputs"):
        dataset = inspect_dataset(write(tmp_path, f"{name}.npz", digits_npz_bytes(input_name=name, n=8)))
        assert check_dataset_for_model(model, dataset) == {name: "input"}


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_dataset_mismatch_says_what_is_wrong(
    tmp_path: Path, digits_models: dict[str, ModelInspection], fmt: str
) -> None:
    model = digits_models[fmt]
    labels = np.zeros(4, np.int64)

    wrong_name = inspect_dataset(npz(tmp_path, "a.npz", pixels=np.zeros((4, 1, 8, 8), np.float32), labels=labels))
    err = refused("dataset_mismatch", lambda: check_dataset_for_model(model, wrong_name))
    assert "'input'" in err.message and "'pixels'" in err.message
    assert err.details["missing_inputs"] == ["input"] and err.details["unexpected_arrays"] == ["pixels"]

    wrong_shape = inspect_dataset(npz(tmp_path, "b.npz", input=np.zeros((4, 1, 4, 4), np.float32)))
    err = refused("dataset_mismatch", lambda: check_dataset_for_model(model, wrong_shape))
    assert "[1, 4, 4]" in err.message and "[1, 8, 8]" in err.message

    wrong_rank = inspect_dataset(npz(tmp_path, "c.npz", input=np.zeros((4, 64), np.float32)))
    refused("dataset_mismatch", lambda: check_dataset_for_model(model, wrong_rank))

    wrong_kind = inspect_dataset(npz(tmp_path, "d.npz", input=np.zeros((4, 1, 8, 8), np.int64)))
    err = refused("dataset_mismatch", lambda: check_dataset_for_model(model, wrong_kind))
    assert "int64" in err.message and "float" in err.message

    extra = inspect_dataset(
        npz(tmp_path, "e.npz", input=np.zeros((4, 1, 8, 8), np.float32), mask=np.zeros((4, 3), np.float32))
    )
    err = refused("dataset_mismatch", lambda: check_dataset_for_model(model, extra))
    assert "'mask'" in err.message

    # float64 data for a float32 input is the same kind: accepted (the worker casts).
    wider = inspect_dataset(npz(tmp_path, "f.npz", input=np.zeros((4, 1, 8, 8), np.float64)))
    assert check_dataset_for_model(model, wider) == {"input": "input"}


def test_multi_input_model_needs_every_input_by_name(tmp_path: Path, workdir: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    model = inspect_model(write(tmp_path, "two.onnx", data), workdir)
    both = inspect_dataset(npz(tmp_path, "ab.npz", a=np.zeros((2, 3), np.float32), b=np.ones((2, 3), np.float32)))
    assert check_dataset_for_model(model, both) == {"a": "a", "b": "b"}
    only_a = inspect_dataset(npz(tmp_path, "a.npz", inputs=np.zeros((2, 3), np.float32)))
    err = refused("dataset_mismatch", lambda: check_dataset_for_model(model, only_a))
    assert "'a'" in err.message and "'b'" in err.message


# ----------------------------------------------------------------------------------------------------- no torch


def test_inspection_never_imports_torch(tmp_path: Path) -> None:
    model_bytes, data = external_data_model(tmp_path)
    files = {
        "onnx": write(tmp_path, "m.onnx", digits_onnx_bytes()),
        "pt2": write(tmp_path, "m.pt2", digits_pt2_bytes()),
        "zip": write(tmp_path, "m.zip", make_zip([("digits.onnx", model_bytes), ("weights.bin", data)])),
        "pickle": write(tmp_path, "p.pt", pickle.dumps({"a": 1})),
        "npz": write(tmp_path, "d.npz", digits_npz_bytes(n=10)),
    }
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import app.inspection as insp
        from app.errors import InvalidUpload
        files = {{k: Path(v) for k, v in {json.dumps({k: str(v) for k, v in files.items()})}.items()}}
        work = Path({str(tmp_path)!r})
        models = [insp.inspect_model(files[k], work / ("w_" + k)) for k in ("onnx", "pt2", "zip")]
        try:
            insp.inspect_model(files["pickle"], work / "w_p")
            raise SystemExit("pickle accepted")
        except InvalidUpload:
            pass
        dataset = insp.inspect_dataset(files["npz"])
        for m in models:
            insp.check_dataset_for_model(m, dataset)
        print("torch" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []"
