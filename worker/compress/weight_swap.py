"""One loaded torch model, many one-layer variants: weights copied into the live model and back, nothing written.

Per-layer sensitivity (``worker.compress.sensitivity``) runs the model once per prunable layer with only that
layer changed. Writing each variant as a model file and loading it again costs the model's size in I/O and a full
load per layer (MiniLM as a Hugging Face folder: 14 s of the analysis's total); copying one tensor in place costs
its own bytes. The ONNX backend does the same with ONNX Runtime sessions (``onnx_format.OnnxWeightSwapper``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

import numpy as np
import torch

R = TypeVar("R")


class ModuleWeightSwapper(Generic[R]):
    """``open(weights)`` puts ``weights`` in place of the named live tensors of ``runner``'s model (undoing what the
    previous ``open`` changed) and returns that same runner: use it before the next ``open``. ``open({})`` is the
    model as stored. None for a name it does not hold or a shape that differs; the caller then writes the model."""

    def __init__(self, runner: R, tensors: Mapping[str, torch.Tensor]) -> None:
        self.runner = runner
        self._tensors = dict(tensors)
        self._saved: dict[str, torch.Tensor] = {}

    def open(self, weights: dict[str, np.ndarray]) -> R | None:
        self._restore()
        if not weights.keys() <= self._tensors.keys():
            return None
        with torch.no_grad():
            for name, values in weights.items():
                live = self._tensors[name]
                new = torch.from_numpy(np.ascontiguousarray(values)).to(dtype=live.dtype, device=live.device)
                if new.shape != live.shape:
                    self._restore()
                    return None
                self._saved[name] = live.detach().clone()
                live.copy_(new)
        return self.runner

    def _restore(self) -> None:
        with torch.no_grad():
            for name, original in self._saved.items():
                self._tensors[name].copy_(original)
        self._saved = {}


def tensor_at(module: torch.nn.Module, dotted: str) -> torch.Tensor | None:
    """The tensor attribute at ``a.b.c`` of ``module`` (a parameter, buffer or plain tensor constant), or None."""
    obj: object = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None
