"""The search planner on its own: a pure function of the trials so far, driven here by a simulated model.

The end-to-end tests (tests/e2e/test_search.py) run real searches through the service; these check the
strategy over many outcomes quickly: it finds the best recipe of the grid a person would search exhaustively,
with fewer trials, never picks one that misses the budget, and turns to mixed precision when a quantization
alone misses. The "model" is a deterministic table of outcomes: accuracy falls with sparsity and with fewer
bits; pruning shrinks an encoded file.
"""

from __future__ import annotations

import itertools
from typing import Any

from app.search import planner
from app.search.schemas import SearchSpec
from app.search.service import summarize

BASE_ACC, BASE_SIZE = 0.98, 100_000
QUANT = {None: (1.0, 0.0), "int8_static": (0.30, 0.001), "int8_dynamic": (0.37, 0.0), "int8_weight_only": (0.36, 0.0),
         "int4_weight_only": (0.27, 0.004), "fp16": (0.5, 0.0)}  # fmt: skip
LAYERS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def outcome(steps: list[dict[str, Any]], *, int4_loss: float = 0.004) -> dict[str, Any]:
    recipe = planner.recipe_of(planner.normalized(steps))
    size_factor, loss = QUANT[recipe.quantize]
    if recipe.quantize == "int4_weight_only":
        loss = int4_loss * (0.2 if "fc1.weight" in recipe.exclude else 1.0)  # fc1 carries most of int4's loss
        size_factor += 0.05 * len(recipe.exclude)
    sparsity = recipe.sparsity
    loss += {0.0: 0.0, 0.5: 0.005, 0.7: 0.012, 0.8: 0.05, 0.9: 0.2, 0.95: 0.4}[sparsity]
    if recipe.mode == "finetune":
        loss /= 3
    encoded = any(s["op"] == "encode" for s in steps)
    size = BASE_SIZE * size_factor * ((1 - sparsity) * 1.15 if encoded and sparsity else 1.0)
    layers = [
        {"name": n, "sensitivity": -(0.02 if n == "fc1.weight" else 0.001) * (1 if recipe.quantize else 0.5)}
        for n in LAYERS
    ]
    return {
        "baseline": {"accuracy": BASE_ACC, "size_bytes": BASE_SIZE, "latency_ms": {"p50": 1.0}, "layers": layers},
        "result": {"accuracy": round(BASE_ACC - loss, 6), "size_bytes": int(size), "cosine": 1 - loss,
                   "latency_ms": {"p50": 1.0}},
    }  # fmt: skip


def run(
    spec: SearchSpec, fmt: str = "onnx", parallel: int = 1, **kwargs: Any
) -> tuple[list[planner.TrialView], Any, int]:
    """Plan, run what it starts (all at once), repeat; returns the trials, the summary and the rounds it took."""
    trials: list[planner.TrialView] = []
    for rounds in range(100):
        decision = planner.plan(spec, fmt, trials, out_of_time=False, parallel=parallel)
        if decision.finished:
            return trials, summarize(spec, trials, decision.skipped), rounds
        assert decision.start, "not finished, yet nothing to start and nothing running"
        for i, (_recipe, steps) in enumerate(decision.start):
            trials.append(planner.TrialView(f"job_{len(trials)}_{i}", planner.normalized(steps), "succeeded",
                                            outcome(steps, **kwargs)))  # fmt: skip
    raise AssertionError("the search did not finish")


def exhaustive_best(spec: SearchSpec, budget: float) -> int:
    """What a person searching the whole default grid (every quantization x every sparsity) would find."""
    best = None
    for q, s in itertools.product(QUANT, [0.0, *planner.DEFAULT_SPARSITY]):
        steps = planner.steps_for(planner.Recipe(q, s), "onnx", spec)
        if steps is None:
            continue
        m = outcome(steps)
        if BASE_ACC - m["result"]["accuracy"] <= budget and (best is None or m["result"]["size_bytes"] < best):
            best = m["result"]["size_bytes"]
    assert best is not None
    return best


def test_finds_the_grid_optimum_with_fewer_trials_and_keeps_the_budget() -> None:
    spec = SearchSpec.model_validate(
        {"model_id": "m", "dataset_id": "d", "constraint": {"max_accuracy_drop": 0.01}, "max_trials": 40}
    )
    trials, result, _ = run(spec)
    grid = len(QUANT) * (1 + len(planner.DEFAULT_SPARSITY)) - 1
    assert len(trials) < grid / 2, (len(trials), grid)
    assert result.best is not None and result.best.meets_constraint
    assert BASE_ACC - result.best.accuracy <= 0.01
    assert result.best.size_bytes <= exhaustive_best(spec, 0.01)
    assert all(t.meets_constraint for t in result.pareto_front if t.job_id == result.best.job_id)


def test_an_impossible_budget_gives_the_closest_miss_and_by_how_much() -> None:
    spec = SearchSpec.model_validate(
        {"model_id": "m", "dataset_id": "d", "constraint": {"min_cosine": 1.0},
         "space": {"quantize": ["int8_static", "int4_weight_only"]}}
    )  # fmt: skip
    trials, result, _ = run(spec)
    assert result.best is None and result.closest is not None
    assert result.closest.cosine == max(t.metrics["result"]["cosine"] for t in trials)
    assert "No trial met min_cosine 1" in result.statement and "missed it by" in result.statement


def test_a_quantization_that_misses_alone_is_retried_with_its_most_sensitive_layers_in_float() -> None:
    spec = SearchSpec.model_validate(
        {"model_id": "m", "dataset_id": "d", "constraint": {"max_accuracy_drop": 0.003},
         "space": {"quantize": ["int4_weight_only"], "sparsity": [0.5]}}
    )  # fmt: skip
    trials, result, _ = run(spec, int4_loss=0.004)  # int4 alone loses 0.4 points: over the budget
    mixed = [t for t in trials if planner.recipe_of(t.steps).exclude]
    assert mixed and planner.recipe_of(mixed[0].steps).exclude == ("fc1.weight",)  # the most sensitive layer
    assert result.best is not None and result.best.meets_constraint
    assert "kept float" in result.best.recipe


def test_a_trial_that_cannot_beat_the_best_is_skipped_with_its_reason() -> None:
    spec = SearchSpec.model_validate(
        {"model_id": "m", "dataset_id": "d", "constraint": {"max_accuracy_drop": 0.02},
         "space": {"quantize": ["fp16", "int4_weight_only"], "sparsity": [0.5]}}
    )  # fmt: skip

    def trial(q: str | None, sparsity: float, size: int) -> planner.TrialView:
        steps = planner.steps_for(planner.Recipe(q, sparsity), "onnx", spec)
        assert steps is not None
        metrics = outcome(steps)
        metrics["result"]["size_bytes"] = size
        return planner.TrialView(f"job_{q}_{sparsity}", planner.normalized(steps), "succeeded", metrics)

    # Done: both quantizations alone, pruning alone, and int4 pruned and encoded at 10,000 bytes. fp16 pruned to
    # 0.5 is next on its line, but even encoded it is at best 50,000 * (1 - 0.5) * 0.5 = 12,500 bytes; int4 alone
    # encoded (the smallest quantization that meets the budget, stored with the squeeze encoding) at best
    # 27,000 * 0.5 = 13,500 bytes.
    trials = [trial("fp16", 0.0, 50_000), trial("int4_weight_only", 0.0, 27_000), trial(None, 0.5, 57_500),
              trial("int4_weight_only", 0.5, 10_000)]  # fmt: skip
    decision = planner.plan(spec, "onnx", trials, out_of_time=False)
    skipped = {(r.quantize, r.sparsity, r.mode): why for r, why in decision.skipped}
    assert set(skipped) == {("fp16", 0.5, "magnitude"), ("int4_weight_only", 0.0, "encoded")}
    assert "cannot beat the best so far (12500 >= 10000)" in skipped[("fp16", 0.5, "magnitude")]
    assert "cannot beat the best so far (13500 >= 10000)" in skipped[("int4_weight_only", 0.0, "encoded")]
    assert not decision.start and decision.finished


def test_the_smallest_quantization_that_meets_the_budget_is_also_tried_encoded() -> None:
    spec = SearchSpec.model_validate(
        {"model_id": "m", "dataset_id": "d", "constraint": {"min_cosine": 0.99},
         "space": {"quantize": ["int8_dynamic", "int8_weight_only"], "sparsity": [0.5]}}
    )  # fmt: skip

    def trial(q: str | None, sparsity: float, size: int, cosine: float) -> planner.TrialView:
        steps = planner.steps_for(planner.Recipe(q, sparsity), "onnx", spec)
        assert steps is not None
        metrics = outcome(steps)
        metrics["result"].update(size_bytes=size, cosine=cosine)
        return planner.TrialView(f"job_{q}_{sparsity}", planner.normalized(steps), "succeeded", metrics)

    # Both quantizations meet the budget; pruning does not. Weight-only takes the embedding tables too (size).
    trials = [trial("int8_dynamic", 0.0, 23_000, 0.991), trial("int8_weight_only", 0.0, 23_300, 0.9997),
              trial(None, 0.5, 50_000, 0.88)]  # fmt: skip
    assert trials[1].steps[0]["include"] == ["embedding"]
    decision = planner.plan(spec, "onnx", trials, out_of_time=False)
    assert [(r.quantize, r.mode) for r, _ in decision.start] == [("int8_dynamic", "encoded")]
    steps = decision.start[0][1]
    assert [s["op"] for s in steps] == ["quantize", "encode"]
    assert decision.start[0][0].label() == "int8_dynamic + squeeze encoding"
    # One such trial per search: once it is measured, the search is over (pruning missed, nothing else to try).
    done = planner.TrialView("job_enc", planner.normalized(steps), "succeeded", outcome(steps))
    done.metrics["result"].update(size_bytes=11_000, cosine=0.991)
    decision = planner.plan(spec, "onnx", [*trials, done], out_of_time=False)
    assert not decision.start and not decision.skipped and decision.finished
    # Nothing is encoded before every quantization alone is measured: the smallest is not known yet.
    running = planner.TrialView("job_wo", trials[1].steps, "running")
    decision = planner.plan(spec, "onnx", [trials[0], running, trials[2]], out_of_time=False)
    assert not decision.start and not decision.finished
    # A model format without the encoding never gets such a trial.
    assert planner.steps_for(planner.Recipe("int8_dynamic", mode="encoded"), "hf", spec) is None


def test_more_workers_shorten_the_sequential_part_and_find_the_same_best() -> None:
    spec = SearchSpec.model_validate(
        {"model_id": "m", "dataset_id": "d", "constraint": {"max_accuracy_drop": 0.01}, "max_trials": 40}
    )
    _, one, rounds_one = run(spec, parallel=1)
    _, three, rounds_three = run(spec, parallel=3)
    assert three.best is not None and one.best is not None
    assert three.best.size_bytes == one.best.size_bytes
    assert rounds_three < rounds_one, (rounds_three, rounds_one)
