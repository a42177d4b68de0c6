"""N:M patterns and per-layer overrides, on the numpy arithmetic and through both backends' saved models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.jobs.spec import JobSpec, PruneMagnitude
from tests.support.models import digits_onnx_bytes, digits_pt2_bytes
from worker.compress.backend import get_backend
from worker.compress.pruning import nm_mask, step_masks


def _groups_along(array: np.ndarray, axis: int, m: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, -1)
    k = moved.shape[-1] - moved.shape[-1] % m
    return moved[..., :k].reshape(*moved.shape[:-1], k // m, m)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_mask_keeps_exactly_n_largest_of_every_m(n: int, m: int):
    scores = np.abs(np.random.default_rng(n * 10 + m).standard_normal((6, 32, 3, 3)))
    keep = nm_mask(scores, n, m, axis=1)
    groups = _groups_along(keep, 1, m)
    assert (groups.sum(axis=-1) == n).all()
    # The kept ones are the largest of their group.
    s = _groups_along(scores, 1, m)
    assert (np.where(groups, s, np.inf).min(-1) >= np.where(groups, -np.inf, s).max(-1)).all()


def test_overrides_prune_named_layers_on_their_own_and_leave_zero_ones_alone():
    rng = np.random.default_rng(0)
    scores = {"conv1.weight": rng.random((8, 8)), "fc.weight": rng.random((10, 10)), "head.weight": rng.random(20)}
    masks = step_masks(scores, sparsity=0.5, scope="global", overrides={"head.*": 0.0, "fc*": 0.9})
    assert masks["head.weight"].all()
    assert (~masks["fc.weight"]).sum() == 90
    assert (~masks["conv1.weight"]).sum() == 32


def test_spec_refuses_bad_patterns_and_contradictions():
    for bad in ({"pattern": "4:2"}, {"pattern": "2-4"}, {"pattern": "2:4", "sparsity": 0.3}, {}):
        with pytest.raises(ValueError):
            JobSpec.model_validate({"model_id": "m", "steps": [{"method": "magnitude", **bad}]})
    step = JobSpec.model_validate({"model_id": "m", "steps": [{"method": "magnitude", "pattern": "2:4"}]}).steps[0]
    assert isinstance(step, PruneMagnitude) and step.target_sparsity == 0.5


def test_onnx_two_four_is_along_each_weights_reduction_axis(tmp_path: Path):
    src = tmp_path / "digits.onnx"
    src.write_bytes(digits_onnx_bytes())
    dst = tmp_path / "pruned.onnx"
    report = get_backend("onnx").prune_magnitude(src, dst, PruneMagnitude(method="magnitude", pattern="2:4"))
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    # Conv [out, in, kh, kw]: groups of 4 input channels; Gemm (transB=1) [out, in]: groups of 4 inputs.
    assert (_groups_along(weights["2.weight"] != 0, 1, 4).sum(-1) <= 2).all()
    assert (_groups_along(weights["6.weight"] != 0, 1, 4).sum(-1) <= 2).all()
    assert (weights["0.weight"] != 0).all()  # one input channel: no group of 4 to thin out
    assert report.details["pattern"] == "2:4"
    assert 0.45 < report.details["achieved_sparsity"] <= 0.5


def test_pt2_overrides_and_pattern_reach_the_saved_program(tmp_path: Path):
    import torch

    src = tmp_path / "digits.pt2"
    src.write_bytes(digits_pt2_bytes())
    dst = tmp_path / "pruned.pt2"
    step = PruneMagnitude(method="magnitude", pattern="2:4", overrides={"8.*": 0.0})
    get_backend("pt2").prune_magnitude(src, dst, step)
    state = torch.export.load(str(dst)).state_dict
    assert bool((state["8.weight"] != 0).all())  # excluded by the override
    fc = state["6.weight"].detach().numpy() != 0
    assert (_groups_along(fc, 1, 4).sum(-1) == 2).all()
