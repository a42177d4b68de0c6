"""The job spec: one pydantic schema shared by the API (validation at the door) and the worker.

Steps are a tagged union on ``op`` and then ``method``; unknown fields are refused everywhere, so a bad spec is
answered with 422 by the API and never reaches a worker. This module must stay free of torch, SQL and Celery.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_SPARSITY = Field(ge=0.0, lt=1.0, description="Share of prunable weights set to zero, in [0, 1).")
_OVERRIDES = Field(
    default_factory=dict,
    max_length=256,
    description=(
        'Per-layer sparsity by layer-name pattern (fnmatch, e.g. `"*.fc*"` or `"conv1*"`); the first pattern '
        "that matches a layer wins; 0 leaves the layer alone. Layer names are those in the job's per-layer table."
    ),
)


def _check_overrides(overrides: dict[str, float]) -> dict[str, float]:
    for pattern, value in overrides.items():
        if not pattern or len(pattern) > 256:
            raise ValueError("override patterns must be 1-256 characters")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"override {pattern!r}: sparsity {value} is outside [0, 1)")
    return overrides


def _check_pattern(pattern: str | None) -> str | None:
    if pattern is not None:
        parse_pattern(pattern)
    return pattern


Overrides = Annotated[dict[str, float], AfterValidator(_check_overrides)]
NMPattern = Annotated[str | None, AfterValidator(_check_pattern)]


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M): at most N non-zero weights in every M consecutive weights along the input axis."""
    n_text, _, m_text = pattern.partition(":")
    if not (n_text.isdigit() and m_text.isdigit()):
        raise ValueError('pattern must look like "2:4" (N:M with N < M)')
    n, m = int(n_text), int(m_text)
    if not 1 <= n < m <= 64:
        raise ValueError(f"pattern {pattern!r}: need 1 <= N < M <= 64")
    return n, m


class PruneMagnitude(_Strict):
    """Magnitude pruning: unstructured to an exact sparsity (global or per layer), or N:M semi-structured."""

    op: Literal["prune"] = "prune"
    method: Literal["magnitude"]
    sparsity: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Share of prunable weights set to zero, in [0, 1). Implied by `pattern` (2:4 -> 0.5).",
    )
    scope: Literal["global", "per_layer"] = Field(
        "global",
        description="global: one threshold over all prunable weights; per_layer: each layer at `sparsity`.",
    )
    pattern: NMPattern = Field(
        None,
        max_length=8,
        description='N:M semi-structured sparsity, e.g. "2:4": keep the N largest of every M input weights.',
    )
    overrides: Overrides = _OVERRIDES

    @model_validator(mode="after")
    def _sparsity_or_pattern(self) -> PruneMagnitude:
        if self.pattern is None and self.sparsity is None:
            raise ValueError('give a sparsity in [0, 1), or an N:M pattern such as "2:4"')
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern} implies sparsity {1 - n / m:g}; leave sparsity out")
            if self.overrides and any(v not in (0.0, 1 - n / m) for v in self.overrides.values()):
                raise ValueError("with a pattern, overrides may only exclude layers (0)")
        return self

    @property
    def target_sparsity(self) -> float:
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            return 1 - n / m
        return self.sparsity or 0.0


class PruneStructured(_Strict):
    """Remove whole channels/filters (and the matching inputs of the layers that consume them): smaller and faster."""

    op: Literal["prune"] = "prune"
    method: Literal["structured"]
    sparsity: float = Field(ge=0.0, lt=1.0, description="Share of each prunable layer's output channels removed.")
    norm: Literal["l1", "l2"] = Field("l1", description="Channels with the smallest L1/L2 weight norm go first.")
    round_to: int = Field(1, ge=1, le=128, description="Keep a multiple of this many channels per layer.")
    overrides: Overrides = _OVERRIDES


class PruneGradient(_Strict):
    """First-order Taylor saliency |w * dL/dw| accumulated over the dataset (labels, else the original's outputs)."""

    op: Literal["prune"] = "prune"
    method: Literal["gradient"]
    sparsity: float = _SPARSITY
    scope: Literal["global", "per_layer"] = "global"
    samples: int = Field(512, ge=1, le=100_000, description="Dataset samples used to accumulate saliency.")
    overrides: Overrides = _OVERRIDES


class PruneRegularized(_Strict):
    """Short sparse fine-tuning with an L1/L2 penalty, then magnitude thresholding to ``sparsity``.

    Trains on the labels when the dataset has them, else distils from the original model's outputs.
    """

    op: Literal["prune"] = "prune"
    method: Literal["regularized"]
    sparsity: float = _SPARSITY
    penalty: Literal["l1", "l2"] = "l1"
    # Defaults measured on the digits CNN at 90%: 1e-2 / 5 epochs / lr 3e-3 gives 0.932 where 1e-4 / 3 / 1e-3
    # gave 0.700, below one-shot magnitude.
    strength: float = Field(1e-2, gt=0.0, le=1.0, description="Penalty weight.")
    epochs: int = Field(5, ge=1, le=20)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=4096)
    scope: Literal["global", "per_layer"] = "global"


class PruneWanda(_Strict):
    """Wanda: |weight| x input-activation norm, per output row, for Linear/MatMul layers (transformers)."""

    op: Literal["prune"] = "prune"
    method: Literal["wanda"]
    sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    pattern: NMPattern = Field(None, max_length=8, description='N:M, e.g. "2:4".')
    calibration_samples: int = Field(128, ge=1, le=10_000)

    @model_validator(mode="after")
    def _sparsity_or_pattern(self) -> PruneWanda:
        if (self.pattern is None) == (self.sparsity is None):
            raise ValueError("give either a sparsity or an N:M pattern")
        return self


class Finetune(_Strict):
    """Recover accuracy after pruning: train on labels, or distil from the original model. Zeros stay zero."""

    op: Literal["finetune"] = "finetune"
    method: Literal["distill", "labels"]
    # Measured on the digits CNN pruned to 90%: lr 3e-3 recovers 0.733 -> 0.970 in 3 epochs (1e-3: 0.909).
    epochs: int = Field(3, ge=1, le=50)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=4096)
    temperature: float = Field(2.0, gt=0.0, le=20.0, description="Distillation temperature (distill only).")


_EXCLUDE = Field(
    default_factory=list,
    max_length=256,
    description=(
        "Weights left in floating point, by layer-name pattern (fnmatch, as in the per-layer table): mixed "
        "precision, e.g. the most sensitive layers kept float while the rest is quantized."
    ),
)


def _check_patterns(patterns: list[str]) -> list[str]:
    if any(not p or len(p) > 256 for p in patterns):
        raise ValueError("layer-name patterns must be 1-256 characters")
    return patterns


LayerPatterns = Annotated[list[str], AfterValidator(_check_patterns)]

_INCLUDE = Field(
    default_factory=list,
    max_length=4,
    description='Also quantize these non-Linear tables: ["embedding"] (MiniLM\'s embedding is half its bytes).',
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


class QuantizeInt8WeightOnly(_Strict):
    """Int8 weights (per channel, or grouped), float activations."""

    op: Literal["quantize"] = "quantize"
    method: Literal["int8_weight_only"]
    group_size: int | None = Field(None, ge=16, le=4096, description="None: one scale per output channel.")
    include: list[Literal["embedding"]] = _INCLUDE
    exclude: LayerPatterns = _EXCLUDE


class QuantizeInt4WeightOnly(_Strict):
    """Int4 weights in groups along the input axis, stored packed (two per byte), float activations."""

    op: Literal["quantize"] = "quantize"
    method: Literal["int4_weight_only"]
    group_size: int = Field(32, ge=16, le=1024, description="Weights sharing one scale (power of two).")
    symmetric: bool = True
    include: list[Literal["embedding"]] = _INCLUDE
    exclude: LayerPatterns = _EXCLUDE

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("group_size must be a power of two")
        return value


class QuantizeFp16(_Strict):
    """Weights and compute in float16; inputs and outputs keep their original dtype."""

    op: Literal["quantize"] = "quantize"
    method: Literal["fp16"]


class QuantizeBf16(_Strict):
    """Weights and compute in bfloat16; inputs and outputs keep their original dtype."""

    op: Literal["quantize"] = "quantize"
    method: Literal["bf16"]


class ConvertOnnx(_Strict):
    """Export a PyTorch model (pt2, TorchScript) to ONNX; later steps and the measurement run in ONNX Runtime."""

    op: Literal["convert"] = "convert"
    method: Literal["onnx"]
    opset: int = Field(18, ge=13, le=21)


class EncodeSqueeze(_Strict):
    """Storage encoding (Deep Compression's last stage): sparse weights as a bitmask, values quantized, entropy-coded.

    Must be the last step. The artifact is a ``.sqz`` file that ``squeeze.loader`` turns back into a model for its
    runtime; the report gives its size next to the entropy bound of the stored weights.
    """

    op: Literal["encode"] = "encode"
    method: Literal["squeeze"]
    value_bits: int = Field(8, ge=2, le=8, description="Bits per stored non-zero value.")
    value_coding: Literal["uniform", "kmeans"] = Field(
        "uniform",
        description=(
            "uniform: 2**value_bits even steps per output channel (one scale each). kmeans: Deep Compression's "
            "weight sharing, 2**value_bits values per tensor placed by k-means (a codebook); at 3-4 bits it "
            "distorts the outputs less than uniform and stores a little smaller."
        ),
    )
    float_tensors: Literal["exact", "float16"] = Field(
        "exact",
        description=(
            "The float tensors that are not quantized weights (biases, normalization, embedding tables): exact, or "
            "float16 (lossy, half their bytes; kept exact where float16 cannot hold a value). On a 96%-pruned CNN "
            "its biases are an eighth of the file."
        ),
    )
    level: int = Field(19, ge=1, le=22, description="zstd level.")


STEP_TYPES: dict[str, type[_Strict]] = {
    "prune/magnitude": PruneMagnitude,
    "prune/structured": PruneStructured,
    "prune/gradient": PruneGradient,
    "prune/regularized": PruneRegularized,
    "prune/wanda": PruneWanda,
    "finetune/distill": Finetune,
    "finetune/labels": Finetune,
    "quantize/int8_dynamic": QuantizeInt8Dynamic,
    "quantize/int8_static": QuantizeInt8Static,
    "quantize/int8_weight_only": QuantizeInt8WeightOnly,
    "quantize/int4_weight_only": QuantizeInt4WeightOnly,
    "quantize/fp16": QuantizeFp16,
    "quantize/bf16": QuantizeBf16,
    "convert/onnx": ConvertOnnx,
    "encode/squeeze": EncodeSqueeze,
}


# The steps that train on data: the only ones a job's ``train_dataset_id`` feeds. Calibration (int8_static, wanda)
# and every measurement use ``dataset_id``.
TRAINING_STEPS: tuple[str, ...] = ("prune/gradient", "prune/regularized", "finetune/distill", "finetune/labels")


def trains(step: Any) -> bool:
    """Whether ``step`` trains on data (and so uses a job's ``train_dataset_id`` when it has one)."""
    return f"{step.op}/{step.method}" in TRAINING_STEPS


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
    | Annotated[PruneStructured, Tag("prune/structured")]
    | Annotated[PruneGradient, Tag("prune/gradient")]
    | Annotated[PruneRegularized, Tag("prune/regularized")]
    | Annotated[PruneWanda, Tag("prune/wanda")]
    | Annotated[Finetune, Tag("finetune/distill")]
    | Annotated[Finetune, Tag("finetune/labels")]
    | Annotated[QuantizeInt8Dynamic, Tag("quantize/int8_dynamic")]
    | Annotated[QuantizeInt8Static, Tag("quantize/int8_static")]
    | Annotated[QuantizeInt8WeightOnly, Tag("quantize/int8_weight_only")]
    | Annotated[QuantizeInt4WeightOnly, Tag("quantize/int4_weight_only")]
    | Annotated[QuantizeFp16, Tag("quantize/fp16")]
    | Annotated[QuantizeBf16, Tag("quantize/bf16")]
    | Annotated[ConvertOnnx, Tag("convert/onnx")]
    | Annotated[EncodeSqueeze, Tag("encode/squeeze")],
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
    layer_sensitivity: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Per-layer sensitivity in the report: the metric change when only that layer is compressed. "
            "auto: on when the job has a dataset and the model at most 64 prunable layers."
        ),
    )


class JobSpec(_Strict):
    """What a client posts to ``POST /v1/jobs``."""

    model_id: str = Field(min_length=1, max_length=64)
    dataset_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description=(
            "Both versions are measured on this data and calibration uses it; training steps train on 80% of it "
            "unless train_dataset_id is given."
        ),
    )
    train_dataset_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description=(
            "Training steps (prune/gradient, prune/regularized, finetune/distill, finetune/labels) train on all of "
            "this dataset instead of 80% of dataset_id, and report before/after on dataset_id. Calibration and "
            "every metric stay on dataset_id. Needs dataset_id and a training step."
        ),
    )
    steps: list[Step] = Field(
        default_factory=list,
        max_length=16,
        description="Run in order. An empty list evaluates the model as it is (needs a dataset).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_format: Literal["onnx"] | None = Field(
        None,
        description="Convert the result to this format (same as a final `convert` step; ONNX is the fastest CPU path).",
    )
    evaluation: EvalOptions = Field(default_factory=EvalOptions)
    cache: bool = Field(True, description="Return an earlier identical job's result instead of running again.")
    notify_url: str | None = Field(
        None,
        max_length=2048,
        description="POST the job's final state here (signed; only under URLs an admin allowed).",
    )

    @model_validator(mode="after")
    def _step_order(self) -> JobSpec:
        for i, step in enumerate(self.steps):
            if step.op == "encode" and (i != len(self.steps) - 1 or self.output_format is not None):
                raise ValueError(f"steps[{i}]: an encode step must come last (after any conversion)")
        if sum(step.op == "convert" for step in self.steps) > 1:
            raise ValueError("convert at most once")
        return self

    def effective_steps(self) -> list[Step]:
        """The steps as the worker runs them: ``output_format`` becomes a final ``convert`` step."""
        steps = list(self.steps)
        if self.output_format == "onnx" and not any(s.op == "convert" for s in steps):
            steps.append(ConvertOnnx(method="onnx"))
        return steps

    def cache_key(self, model_sha256: str, dataset_sha256: str | None, train_dataset_sha256: str | None = None) -> str:
        """Hash of what determines the result: input bytes and the canonical spec (ids and cache flag excluded).

        The training data's bytes count only when there is some, so keys of jobs without it stay what they were.
        """
        canonical = self.model_dump(
            mode="json", exclude={"model_id", "dataset_id", "train_dataset_id", "cache", "notify_url"}
        )
        inputs: dict[str, Any] = {"model": model_sha256, "dataset": dataset_sha256, "spec": canonical}
        if train_dataset_sha256 is not None:
            inputs["train_dataset"] = train_dataset_sha256
        payload = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()
