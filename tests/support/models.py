"""Small real models built in the tests: a CNN trained on scikit-learn's digits, exported to ONNX, .pt2 and
TorchScript.

Trained once per process and cached on disk under ``.pytest_cache`` keyed by this file's content, so the whole suite
pays the ~2 s of training once.
"""

from __future__ import annotations

import hashlib
import io
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 8x8 digit images scaled to [0, 1], NCHW float32, int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    x, y = x[idx], y[idx]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def build_digits_cnn():  # -> torch.nn.Module
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@cache
def trained_digits_cnn():  # -> torch.nn.Module (eval mode)
    import torch

    x_train, y_train, _, _ = digits_arrays()
    model = build_digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    return model.eval()


def _cache_dir() -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    d = ROOT / ".pytest_cache" / "squeeze-models" / digest
    d.mkdir(parents=True, exist_ok=True)
    return d


def digits_onnx_bytes() -> bytes:
    """The trained digits CNN as a self-contained ONNX file with a dynamic batch dimension (input ``input``)."""
    path = _cache_dir() / "digits.onnx"
    if not path.exists():
        import torch

        model = trained_digits_cnn()
        buf = io.BytesIO()
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            buf,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
        _atomic_write(path, buf.getvalue())
    return path.read_bytes()


def digits_pt2_bytes() -> bytes:
    """The trained digits CNN as a torch.export program (``.pt2``) with a dynamic batch dimension."""
    path = _cache_dir() / "digits.pt2"
    if not path.exists():
        import torch

        model = trained_digits_cnn()
        batch = torch.export.Dim("batch", min=1, max=65536)
        ep = torch.export.export(model, (torch.zeros(4, 1, 8, 8),), dynamic_shapes=({0: batch},))
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        _atomic_write(path, buf.getvalue())
    return path.read_bytes()


def digits_torchscript_bytes(kind: str = "scripted") -> bytes:
    """The trained digits CNN as a TorchScript archive (``torch.jit.save``): ``scripted`` (no input shapes
    recorded) or ``traced`` (on a batch of 2, which records the example input's shape)."""
    path = _cache_dir() / f"digits-{kind}.pt"
    if not path.exists():
        import torch

        model = trained_digits_cnn()
        if kind == "scripted":
            module = torch.jit.script(model)
        elif kind == "traced":
            module = torch.jit.trace(model, torch.zeros(2, 1, 8, 8))
        else:
            raise ValueError(f"kind must be 'scripted' or 'traced', not {kind!r}")
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        _atomic_write(path, buf.getvalue())
    return path.read_bytes()


def digits_npz_bytes(input_name: str = "input", n: int | None = None, labels: bool = True) -> bytes:
    """The held-out digits as an ``.npz``: one array named ``input_name`` and, optionally, ``labels``."""
    _, _, x_test, y_test = digits_arrays()
    if n is not None:
        x_test, y_test = x_test[:n], y_test[:n]
    buf = io.BytesIO()
    arrays = {input_name: x_test}
    if labels:
        arrays["labels"] = y_test
    np.savez(buf, **arrays)
    return buf.getvalue()


def digits_test_accuracy_torch() -> float:
    import torch

    _, _, x_test, y_test = digits_arrays()
    model = trained_digits_cnn()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(1).numpy()
    return float((pred == y_test).mean())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
