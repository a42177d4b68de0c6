"""Hostile TorchScript-looking uploads against ``app.inspection``: real archives from ``torch.jit.save``, altered.

An archive passes only if every pickle imports what TorchScript writes, its code calls standard operators only and
its layout is that of ``torch.jit.save``; nothing is unpickled (canary files) or executed, and nothing is written.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from app.errors import InvalidUpload
from app.inspection import inspect_model
from app.inspection.torchscript import read_pickle
from tests.support.models import ROOT, digits_torchscript_bytes

DIGITS_PARAMETERS = 16 * 9 + 16 + 32 * 16 * 9 + 32 + 64 * 512 + 64 + 10 * 64 + 10


class Canary:
    """Unpickling this runs ``os.system``: proof, if ``path`` ever appears, that an upload was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def members(kind: str = "scripted") -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(digits_torchscript_bytes(kind))) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def archive(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def upload(tmp_path: Path, data: bytes, name: str = "model.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(code: str, path: Path, workdir: Path) -> InvalidUpload:
    with pytest.raises(InvalidUpload) as info:
        inspect_model(path, workdir)
    assert info.value.code == code, f"{info.value.code}: {info.value.message}"
    assert info.value.status_code == 422 and info.value.message
    assert not any(workdir.iterdir())
    return info.value


def root_of(entries: dict[str, bytes]) -> str:
    return next(iter(entries)).split("/", 1)[0]


def code_file(entries: dict[str, bytes]) -> str:
    return next(n for n in entries if n.endswith("container.py"))


# ----------------------------------------------------------------------------------------------------- good archives


@pytest.mark.parametrize("kind", ["scripted", "traced"])
def test_torchscript_archives_are_inspected(tmp_path: Path, workdir: Path, kind: str) -> None:
    info = inspect_model(upload(tmp_path, digits_torchscript_bytes(kind), "weights.bin"), workdir)
    assert info.format == "torchscript" and info.packaging == "file"
    assert [i.name for i in info.inputs] == ["input"]
    assert [o.name for o in info.outputs] == ["output"]
    assert info.parameters == DIGITS_PARAMETERS
    assert info.details["parameter_dtypes"] == {"float32": DIGITS_PARAMETERS}
    assert info.details["module"].endswith("Sequential") and info.details["traced"] == (kind == "traced")
    if kind == "traced":  # torch.jit.trace records its example input's metadata
        assert info.inputs[0].shape == [2, 1, 8, 8] and info.inputs[0].dtype == "float32"
    else:  # a scripted module records none
        assert info.inputs[0].shape is None and info.inputs[0].dtype is None
    assert not any(workdir.iterdir())


def test_multi_input_signature_and_optional_arguments(tmp_path: Path, workdir: Path) -> None:
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.proj = torch.nn.Linear(4, 2)

        def forward(
            self, ids: torch.Tensor, mask: torch.Tensor, scale: float = 1.0
        ) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.embed(ids) * mask.unsqueeze(-1)
            return self.proj(hidden) * scale, hidden

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Scaled()), buf)
    info = inspect_model(upload(tmp_path, buf.getvalue()), workdir)
    assert [i.name for i in info.inputs] == ["ids", "mask"]
    assert [o.name for o in info.outputs] == ["output_0", "output_1"]
    assert info.details["optional_arguments"] == ["scale"]
    assert info.parameters == 10 * 4 + 4 * 2 + 2


def test_inspection_never_imports_torch(tmp_path: Path) -> None:
    files = {
        kind: str(upload(tmp_path, digits_torchscript_bytes(kind), f"{kind}.pt")) for kind in ("scripted", "traced")
    }
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import app.inspection as insp
        for name, path in {json.dumps(files)}.items():
            work = Path({str(tmp_path)!r}) / ("w_" + name)
            work.mkdir()
            assert insp.inspect_model(Path(path), work).format == "torchscript"
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl", "debug_pkl", "traced_inputs.pkl"])
def test_pickles_importing_code_are_refused_without_being_loaded(tmp_path: Path, workdir: Path, member: str) -> None:
    canary = tmp_path / "canary"
    entries = members("traced")
    root = root_of(entries)
    name = next(n for n in entries if n.endswith(".debug_pkl")) if member == "debug_pkl" else f"{root}/{member}"
    entries[name] = pickle.dumps(Canary(canary), protocol=2)
    err = refused("unsafe_model", upload(tmp_path, archive(entries)), workdir)
    assert any("system" in i for i in err.details["imports"])
    assert not canary.exists()


def test_canary_is_live(tmp_path: Path) -> None:
    """The payload above really would run a command if unpickled (done here in a throwaway process)."""
    canary = tmp_path / "proof"
    payload = upload(tmp_path, pickle.dumps(Canary(canary), protocol=2), "p.pkl")
    subprocess.run(
        [sys.executable, "-c", f"import pickle; pickle.loads(open({str(payload)!r}, 'rb').read())"], check=True
    )
    assert canary.exists()


def test_imports_hidden_behind_stack_global_are_refused(tmp_path: Path, workdir: Path) -> None:
    # STACK_GLOBAL fed by a string built at load time: what it imports cannot be read without running it.
    hidden = b"\x80\x04" + b"\x8c\x02os" + b"\x8c\x06system" + b"\x85" + b"R" + b"\x8c\x02id\x93."
    entries = members()
    entries[f"{root_of(entries)}/constants.pkl"] = hidden
    refused("pickle_not_accepted", upload(tmp_path, archive(entries)), workdir)


def test_zip_without_code_is_a_pickled_checkpoint(tmp_path: Path, workdir: Path) -> None:
    entries = {n: d for n, d in members().items() if "/code/" not in n}
    refused("pickle_not_accepted", upload(tmp_path, archive(entries)), workdir)
    entries = {n: d for n, d in members().items() if not n.endswith("/constants.pkl")}
    refused("pickle_not_accepted", upload(tmp_path, archive(entries)), workdir)


def test_plain_torch_save_zips_are_still_refused(tmp_path: Path, workdir: Path) -> None:
    import torch

    canary = tmp_path / "canary"
    model = torch.jit.load(io.BytesIO(digits_torchscript_bytes()))
    for i, obj in enumerate([dict(model.named_parameters()), {"x": Canary(canary)}]):
        buf = io.BytesIO()
        torch.save(obj, buf)
        refused("pickle_not_accepted", upload(tmp_path, buf.getvalue(), f"ckpt{i}.pt"), workdir)
    assert not canary.exists()


def test_pickle_reader_builds_data_only() -> None:
    """The structure reader turns calls into records: the canary's os.system is named, never called."""
    top = read_pickle(pickle.dumps(Canary(Path("/nonexistent/x")), protocol=2), "p.pkl")
    assert (top.func.module, top.func.name) in {("posix", "system"), ("os", "system"), ("nt", "system")}
    assert top.args == ("touch /nonexistent/x",)


# ----------------------------------------------------------------------------------------------------- code


@pytest.mark.parametrize(
    ("statement", "code"),
    [
        ("_x = torch.from_file('/etc/passwd', False, 10)", "unsafe_model"),
        ("_x = ops.evil.run(input)", "unsupported_operator_domain"),
        ("_x = torch.ops.myext.leak(input)", "unsupported_operator_domain"),
    ],
)
def test_code_calling_file_or_custom_operators_is_refused(
    tmp_path: Path, workdir: Path, statement: str, code: str
) -> None:
    entries = members()
    name = code_file(entries)
    text = entries[name].decode()
    entries[name] = text.replace(
        '    _0 = getattr(self, "0")\n', f'    {statement}\n    _0 = getattr(self, "0")\n', 1
    ).encode()
    assert entries[name].decode() != text
    refused(code, upload(tmp_path, archive(entries)), workdir)


def test_code_that_is_not_torchscript_source_is_refused(tmp_path: Path, workdir: Path) -> None:
    entries = members()
    entries[code_file(entries)] = b"class Sequential(Module:\n"
    refused("invalid_model", upload(tmp_path, archive(entries)), workdir)


def test_forward_with_a_required_non_tensor_argument_is_refused(tmp_path: Path, workdir: Path) -> None:
    entries = members()
    name = code_file(entries)
    entries[name] = entries[name].replace(b"input: Tensor) -> Tensor:", b"input: Tensor, k: int) -> Tensor:", 1)
    err = refused("invalid_model", upload(tmp_path, archive(entries)), workdir)
    assert "k: int" in err.message


# ----------------------------------------------------------------------------------------------------- layout


def test_unknown_members_are_refused(tmp_path: Path, workdir: Path) -> None:
    entries = members()
    entries[f"{root_of(entries)}/libevil.so"] = b"\x7fELF"
    err = refused("unsupported_format", upload(tmp_path, archive(entries)), workdir)
    assert err.details["member"] == "libevil.so"


def test_missing_or_short_storages_are_refused(tmp_path: Path, workdir: Path) -> None:
    entries = members()
    root = root_of(entries)
    storage = max((n for n in entries if n.startswith(f"{root}/data/")), key=lambda n: len(entries[n]))
    short = {**entries, storage: entries[storage][:100]}
    refused("invalid_model", upload(tmp_path, archive(short)), workdir)
    missing = {n: d for n, d in entries.items() if n != storage}
    refused("invalid_model", upload(tmp_path, archive(missing)), workdir)


@pytest.mark.parametrize("name", ["../x", "archive/../../x", "/tmp/squeeze-ts-owned", "archive\\..\\x"])
def test_traversal_members_are_refused_before_writing(tmp_path: Path, workdir: Path, name: str) -> None:
    entries = {**members(), name: b"owned"}
    before = sorted(p.name for p in tmp_path.iterdir())
    refused("unsafe_archive", upload(tmp_path, archive(entries)), workdir)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "model.pt"])
    assert not Path("/tmp/squeeze-ts-owned").exists()
