"""Format-independent pruning arithmetic on numpy weight tensors."""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import numpy as np

from app.jobs.spec import PruneMagnitude
from worker.compress.types import StepReport


def magnitude_masks(
    weights: dict[str, np.ndarray], sparsity: float, scope: Literal["global", "per_layer"]
) -> dict[str, np.ndarray]:
    """Boolean keep-masks that zero exactly ``round(sparsity * n)`` of the smallest-magnitude weights.

    ``global`` ranks all tensors together (layers with many small weights lose more); ``per_layer`` prunes each
    tensor to ``sparsity`` on its own. Ties at the threshold are broken by position, so the count is exact.
    """
    return score_masks({n: np.abs(w.astype(np.float32, copy=False)) for n, w in weights.items()}, sparsity, scope)


def score_masks(
    scores: dict[str, np.ndarray], sparsity: float, scope: Literal["global", "per_layer"]
) -> dict[str, np.ndarray]:
    """Keep-masks that drop exactly ``round(sparsity * n)`` of the lowest-scoring weights (see magnitude_masks)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError("sparsity must be in [0, 1)")
    masks: dict[str, np.ndarray] = {}
    if scope == "per_layer":
        for name, s in scores.items():
            masks[name] = _keep_mask(s.ravel(), sparsity).reshape(s.shape)
        return masks
    names = list(scores)
    if not names:
        return masks
    flat = np.concatenate([scores[n].ravel() for n in names])
    keep = _keep_mask(flat, sparsity)
    offset = 0
    for n in names:
        size = scores[n].size
        masks[n] = keep[offset : offset + size].reshape(scores[n].shape)
        offset += size
    return masks


def layer_overrides(names: list[str], overrides: dict[str, float]) -> dict[str, float]:
    """The override sparsity of each layer that an fnmatch pattern names (first matching pattern wins)."""
    chosen: dict[str, float] = {}
    for name in names:
        for pattern, value in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                chosen[name] = value
                break
    return chosen


def step_masks(
    scores: dict[str, np.ndarray],
    *,
    sparsity: float,
    scope: Literal["global", "per_layer"],
    pattern: tuple[int, int] | None = None,
    overrides: dict[str, float] | None = None,
    reduction_axes: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Keep-masks for a pruning step: N:M groups along each weight's reduction axis, or unstructured.

    ``scores`` rank weights (|w| for magnitude, |w * grad| for gradient...). Layers named by ``overrides`` are
    pruned on their own at their override sparsity (0: untouched); the others follow ``scope``.
    """
    chosen = layer_overrides(list(scores), overrides or {})
    masks: dict[str, np.ndarray] = {}
    if pattern is not None:
        n, m = pattern
        for name, s in scores.items():
            if chosen.get(name) == 0.0:
                masks[name] = np.ones(s.shape, dtype=bool)
            else:
                masks[name] = nm_mask(s, n, m, (reduction_axes or {}).get(name, -1))
        return masks
    for name, value in chosen.items():
        masks[name] = _keep_mask(scores[name].ravel(), value).reshape(scores[name].shape)
    rest = {name: s for name, s in scores.items() if name not in chosen}
    masks.update(score_masks(rest, sparsity, scope))
    return masks


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive weights along ``axis`` (the reduction axis).

    A last group shorter than ``m`` keeps at most ``n`` of its weights. Ties are broken by position.
    """
    moved = np.moveaxis(scores.astype(np.float32, copy=False), axis, -1)
    k = moved.shape[-1]
    pad = (-k) % m
    # Padding scores below any real score: a short last group keeps its own weights first.
    padded = np.concatenate([moved, np.full((*moved.shape[:-1], pad), -1.0, dtype=np.float32)], axis=-1)
    groups = padded.reshape(*moved.shape[:-1], (k + pad) // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    keep = keep.reshape(*moved.shape[:-1], k + pad)[..., :k]
    return np.moveaxis(keep, -1, axis)


def _keep_mask(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
    k = round(sparsity * magnitudes.size)
    keep = np.ones(magnitudes.size, dtype=bool)
    if k > 0:
        drop = np.argpartition(magnitudes, k - 1)[:k]
        keep[drop] = False
    return keep


def channel_keep(scores: np.ndarray, sparsity: float, round_to: int = 1) -> np.ndarray:
    """Keep-mask over a layer's output channels for structured pruning: the highest-scoring ones.

    ``round(sparsity * n)`` channels go (the same count as ``score_masks``); the kept count is then rounded to the
    nearest multiple of ``round_to``, at least ``round_to`` and at most ``n``. Sparsity 0 keeps every channel, and
    at least one channel always stays. Ties are broken by position.
    """
    n = scores.size
    keep_n = n - round(sparsity * n)
    if sparsity > 0 and round_to > 1:
        keep_n = min(n, max(round_to, round(keep_n / round_to) * round_to))
    keep_n = max(1, min(n, keep_n))
    keep = np.zeros(n, dtype=bool)
    keep[np.argsort(-scores.reshape(-1), kind="stable")[:keep_n]] = True
    return keep


def output_axis(ndim: int, reduction_axis: int) -> int:
    """A weight's output-channel axis from its reduction axis: Conv (O, I, ...) 0; a 2-D weight the other axis;
    a batched MatMul weight (..., K, N) the last."""
    axis = reduction_axis % ndim
    if ndim == 2:
        return 1 - axis
    return ndim - 1 if axis == ndim - 2 else 0


def row_keep(scores: np.ndarray, sparsity: float, k_axis: int) -> np.ndarray:
    """Keep-mask dropping the lowest ``round(sparsity * K)`` scores of each output neuron (Wanda's comparison group;
    ties by position). ``k_axis`` is the weight's reduction axis."""
    out = output_axis(scores.ndim, k_axis)
    rows = np.moveaxis(scores, out, 0).reshape(scores.shape[out], -1)
    drop = round(sparsity * rows.shape[1])
    keep = np.ones(rows.shape, dtype=bool)
    if drop:
        order = np.argsort(rows, axis=1, kind="stable")[:, :drop]
        np.put_along_axis(keep, order, False, axis=1)
    return np.moveaxis(keep.reshape(np.moveaxis(scores, out, 0).shape), 0, out)


def magnitude_report(
    step: PruneMagnitude, layers: list[dict[str, Any]], zeros: int, total: int, notes: list[str] | None = None
) -> StepReport:
    """The report of a magnitude step on a torch-based format (pt2, TorchScript, hf): one shape for all three."""
    return StepReport(
        op="prune",
        method="magnitude",
        details={
            "requested": step.target_sparsity,
            "achieved": round(zeros / total, 6),
            "scope": step.scope,
            "pattern": step.pattern,
            "overrides": dict(step.overrides),
            "prunable_parameters": total,
            "zeros": zeros,
            "layers": layers,
        },
        notes=notes or [],
    )
