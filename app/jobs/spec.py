"""The job spec: one pydantic schema shared by the API (validation at the door) and the worker.

Steps are a tagged union on ``op`` and then ``method``; unknown fields are refused everywhere, so a bad spec is
answered with 422 by the API and never reaches a worker. This module must stay free of torch, SQL and Celery.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneMagnitude(_Strict):
    """Unstructured magnitude pruning to exactly ``sparsity`` of the prunable weights (Conv/Linear/MatMul)."""

    op: Literal["prune"] = "prune"
    method: Literal["magnitude"]
    sparsity: float = Field(ge=0.0, lt=1.0, description="Share of prunable weights set to zero, in [0, 1).")
    scope: Literal["global", "per_layer"] = Field(
        "global",
        description="global: one threshold over all prunable weights; per_layer: each layer at `sparsity`.",
    )


class QuantizeInt8Dynamic(_Strict):
    """Int8 weights, activations quantized on the fly. Needs no dataset."""

    op: Literal["quantize"] = "quantize"
    method: Literal["int8_dynamic"]
    per_channel: bool = Field(True, description="Per-output-channel weight scales (measured better on MiniLM).")


class QuantizeInt8Static(_Strict):
    """Int8 weights and activations, activation ranges calibrated on the job's dataset."""

    op: Literal["quantize"] = "quantize"
    method: Literal["int8_static"]
    per_channel: bool = True
    calibration_samples: int = Field(128, ge=1, le=10_000)


class QuantizeFp16(_Strict):
    """Weights and compute in float16; inputs and outputs keep their original dtype."""

    op: Literal["quantize"] = "quantize"
    method: Literal["fp16"]


STEP_TYPES: dict[str, type[_Strict]] = {
    "prune/magnitude": PruneMagnitude,
    "quantize/int8_dynamic": QuantizeInt8Dynamic,
    "quantize/int8_static": QuantizeInt8Static,
    "quantize/fp16": QuantizeFp16,
}


# ``op`` has a default in each step's schema (the method alone names the step), so a step sent without it must be
# told apart by its method too; otherwise the documented default is refused as an unknown step.
OP_OF_METHOD: dict[str, str] = {tag.split("/")[1]: tag.split("/")[0] for tag in STEP_TYPES}


def _step_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        method = value.get("method")
        op = value["op"] if "op" in value else OP_OF_METHOD.get(method) if isinstance(method, str) else None
        return f"{op}/{method}"
    return f"{getattr(value, 'op', None)}/{getattr(value, 'method', None)}"


# One tagged union over (op, method). A callable discriminator rather than nested ``discriminator=`` fields:
# nested ones produce an OpenAPI discriminator mapping that is not valid OpenAPI (and /openapi.json failed).
Step = Annotated[
    Annotated[PruneMagnitude, Tag("prune/magnitude")]
    | Annotated[QuantizeInt8Dynamic, Tag("quantize/int8_dynamic")]
    | Annotated[QuantizeInt8Static, Tag("quantize/int8_static")]
    | Annotated[QuantizeFp16, Tag("quantize/fp16")],
    Discriminator(
        _step_tag,
        custom_error_type="unknown_step",
        custom_error_message=f"unknown op/method; one of: {', '.join(STEP_TYPES)}",
    ),
]


class EvalOptions(_Strict):
    batch_size: int = Field(32, ge=1, le=4096, description="Batch size for accuracy and latency.")
    max_samples: int = Field(2048, ge=1, le=1_000_000, description="Evaluate on at most this many samples.")
    latency_runs: int = Field(20, ge=1, le=1000, description="Timed runs after warm-up.")
    warmup_runs: int = Field(3, ge=0, le=100)


class JobSpec(_Strict):
    """What a client posts to ``POST /v1/jobs``."""

    model_id: str = Field(min_length=1, max_length=64)
    dataset_id: str | None = Field(None, min_length=1, max_length=64)
    steps: list[Step] = Field(
        default_factory=list,
        max_length=16,
        description="Run in order. An empty list evaluates the model as it is (needs a dataset).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    evaluation: EvalOptions = Field(default_factory=EvalOptions)
    cache: bool = Field(True, description="Return an earlier identical job's result instead of running again.")
    notify_url: str | None = Field(
        None,
        max_length=2048,
        description="POST the job's final state here (signed; only under URLs an admin allowed).",
    )

    def cache_key(self, model_sha256: str, dataset_sha256: str | None) -> str:
        """Hash of what determines the result: input bytes and the canonical spec (ids and cache flag excluded)."""
        canonical = self.model_dump(mode="json", exclude={"model_id", "dataset_id", "cache", "notify_url"})
        payload = json.dumps(
            {"model": model_sha256, "dataset": dataset_sha256, "spec": canonical},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()
