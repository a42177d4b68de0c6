"""The search spec (``POST /v1/searches``) and its public view. Torch-free, shared by the API and the workers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.jobs.schemas import JOB_EXAMPLE, JobPublic

# From a real run: the digits CNN, a 1-point accuracy budget, objective size (16 trials on one worker, 134 s).
_BEST_EXAMPLE: dict[str, Any] = {
    "job_id": "job_abfac4550cc442568100a4db9f6d56e8",
    "recipe": "prune 0.5 + int4_weight_only",
    "steps": [
        {"op": "prune", "method": "magnitude", "sparsity": 0.5},
        {"op": "quantize", "method": "int4_weight_only", "group_size": 32},
        {"op": "encode", "method": "squeeze"},
    ],
    "status": "succeeded",
    "reason": None,
    "accuracy": 0.9798,
    "accuracy_drop": 0.005,
    "cosine": 0.9963,
    "size_bytes": 21071,
    "latency_p50_ms": 0.2263,
    "meets_constraint": True,
    "on_pareto_front": True,
}
_SPEC_EXAMPLE: dict[str, Any] = {
    "model_id": "mdl_88801936e32540db99af1ceabc907d0f",
    "dataset_id": "dst_5f0c2a61d3b74e0e9a4c8e2b7d1f3a90",
    "constraint": {"max_accuracy_drop": 0.01},
    "objective": "size",
    "max_trials": 16,
}
_MISS_EXAMPLE = {
    **_BEST_EXAMPLE,
    "job_id": "job_0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f",
    "recipe": "prune 0.7",
    "steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.7}, {"op": "encode", "method": "squeeze"}],
    "accuracy": 0.9748,
    "accuracy_drop": 0.0101,
    "size_bytes": 16187,
    "meets_constraint": False,
}
SEARCH_EXAMPLE: dict[str, Any] = {
    "job": {**JOB_EXAMPLE, "kind": "search", "spec": _SPEC_EXAMPLE},
    "spec": _SPEC_EXAMPLE,
    "trials_done": 16,
    "trials_planned": 16,
    "trials": [_BEST_EXAMPLE, _MISS_EXAMPLE],
    "result": {
        "best": _BEST_EXAMPLE,
        "closest": None,
        "statement": "Best meeting max_accuracy_drop 0.01: prune 0.5 + int4_weight_only: 2.107e+04 bytes (7.33x "
        "better than the original), accuracy 0.9798; 16 trials measured, 0 skipped.",
        "baseline": {"size_bytes": 154355, "accuracy": 0.9849},
        "pareto_front": [_MISS_EXAMPLE, _BEST_EXAMPLE],
    },
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaxAccuracyDrop(_Strict):
    """The accuracy a user may give up (needs labels)."""

    max_accuracy_drop: float = Field(
        ge=0.0, le=1.0, description="Baseline top-1 accuracy minus the result's, at most this (0.01 = 1 point)."
    )

    @property
    def min_cosine(self) -> None:
        return None

    @property
    def metric(self) -> Literal["accuracy"]:
        return "accuracy"


class MinCosine(_Strict):
    """The fidelity the result must keep."""

    min_cosine: float = Field(
        ge=-1.0, le=1.0, description="Mean cosine similarity of the result's outputs with the original's."
    )

    @property
    def max_accuracy_drop(self) -> None:
        return None

    @property
    def metric(self) -> Literal["cosine"]:
        return "cosine"


# Exactly one bound: each form forbids the other's key, so the schema itself says so.
SearchConstraint = MaxAccuracyDrop | MinCosine


class SearchSpace(_Strict):
    """What the search may combine. Left out: every option the model's format offers (``GET /v1/capabilities``)."""

    quantize: list[str] | None = Field(
        None, max_length=8, description='Quantization methods to try, e.g. ["int8_dynamic", "int8_static"].'
    )
    sparsity: list[Annotated[float, Field(gt=0.0, lt=1.0)]] | None = Field(
        None, max_length=12, description="Magnitude-pruning sparsity levels, e.g. [0.5, 0.7, 0.8, 0.9]."
    )
    patterns: list[str] = Field(default_factory=list, max_length=4, description='N:M patterns, e.g. ["2:4"].')
    structured: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=list, max_length=6, description="Structured-pruning levels (share of channels removed)."
    )
    finetune: bool | None = Field(None, description="Try recovering accuracy with a distillation step after pruning.")
    encode: bool | None = Field(
        None, description="Store pruned results with the squeeze encoding (default: when the objective is size)."
    )
    mixed: bool = Field(True, description="Try per-layer sparsity set from each layer's measured sensitivity.")


class SearchSpec(_Strict):
    """What a client posts to ``POST /v1/searches``."""

    model_id: str = Field(min_length=1, max_length=64)
    dataset_id: str = Field(min_length=1, max_length=64, description="Trials are measured on this data.")
    train_dataset_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description=(
            "Fine-tuning trials train on all of this dataset instead of 80% of dataset_id (as a job's "
            "train_dataset_id); every trial is still measured on dataset_id. Needs a format with finetune/distill."
        ),
    )
    constraint: SearchConstraint
    objective: Literal["size", "latency"] = Field("size", description="What the best trial minimises.")
    space: SearchSpace = Field(default_factory=SearchSpace)
    max_trials: int = Field(24, ge=1, le=200)
    time_budget_s: int = Field(1800, ge=10, le=7 * 24 * 3600, description="No trial is started after this.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    notify_url: str | None = Field(None, max_length=2048)


class TrialPublic(BaseModel):
    job_id: str | None
    recipe: str
    steps: list[dict[str, Any]]
    status: str
    reason: str | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    cosine: float | None = None
    size_bytes: int | None = None
    latency_p50_ms: float | None = None
    meets_constraint: bool | None = None
    on_pareto_front: bool = False


class SearchResult(BaseModel):
    best: TrialPublic | None = Field(description="The trial that meets the constraint with the best objective.")
    closest: TrialPublic | None = Field(description="When none meets it: the trial that missed by the least.")
    statement: str
    baseline: dict[str, Any] | None
    pareto_front: list[TrialPublic]


class SearchDetails(BaseModel):
    """What a search adds to its job: the spec, the trials and, once finished, the result."""

    spec: SearchSpec
    trials_done: int
    trials_planned: int
    trials: list[TrialPublic]
    result: SearchResult | None


class SearchPublic(SearchDetails):
    """A search: its job (status, progress, events, cancel work as for any job), its trials and its result."""

    model_config = ConfigDict(json_schema_extra={"examples": [SEARCH_EXAMPLE]})

    job: JobPublic
