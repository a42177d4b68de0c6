"""Format-independent pruning arithmetic on numpy weight tensors."""

from __future__ import annotations

from typing import Literal

import numpy as np


def magnitude_masks(
    weights: dict[str, np.ndarray], sparsity: float, scope: Literal["global", "per_layer"]
) -> dict[str, np.ndarray]:
    """Boolean keep-masks that zero exactly ``round(sparsity * n)`` of the smallest-magnitude weights.

    ``global`` ranks all tensors together (layers with many small weights lose more); ``per_layer`` prunes each
    tensor to ``sparsity`` on its own. Ties at the threshold are broken by position, so the count is exact.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError("sparsity must be in [0, 1)")
    masks: dict[str, np.ndarray] = {}
    if scope == "per_layer":
        for name, w in weights.items():
            masks[name] = _keep_mask(np.abs(w.astype(np.float32, copy=False)).ravel(), sparsity).reshape(w.shape)
        return masks
    names = list(weights)
    flat = np.concatenate([np.abs(weights[n].astype(np.float32, copy=False)).ravel() for n in names])
    keep = _keep_mask(flat, sparsity)
    offset = 0
    for n in names:
        size = weights[n].size
        masks[n] = keep[offset : offset + size].reshape(weights[n].shape)
        offset += size
    return masks


def _keep_mask(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
    k = round(sparsity * magnitudes.size)
    keep = np.ones(magnitudes.size, dtype=bool)
    if k > 0:
        drop = np.argpartition(magnitudes, k - 1)[:k]
        keep[drop] = False
    return keep
