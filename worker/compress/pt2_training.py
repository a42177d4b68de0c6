"""Training on torch.export programs: Taylor saliency, L1/L2-regularized sparse training, and fine-tuning that
keeps pruned weights at zero.

Pure torch, no HTTP, SQL or Celery. ``ExportedProgram.module()`` is a GraphModule whose parameters autograd can
train; the trained values are written back into the program's ``state_dict`` and the program is saved as it
was, so no re-export is needed and the graph is exactly the uploaded one. The graph is the one exported (in
eval mode): batch-norm statistics stay frozen and dropout is absent while training.

Targets. ``labels``: cross-entropy on the primary output (logits [N, classes]). Distillation: the original
model's outputs on the job's data (``StepContext.reference``, computed once by the pipeline's baseline) are the
teacher: a 2-D primary (first) output counts as logits (the project's convention, as for ``accuracy`` and
``agreement``) and gets Hinton's KL(teacher || student) on softmax(x / T), times T^2; every other float output
(embeddings, hidden states) gets MSE.

Data. Without a train dataset a step trains on a seeded 80% of the job's data and reports before/after on the other
20%. With one (``StepContext.train_data``, the job's ``train_dataset_id``) it trains on all of it, with the
original's outputs on it (``StepContext.train_reference``) as the teacher, and reports before/after on all of the
job's data (``dataset_id``); see ``training_plan``.

Work is bounded: at most ``MAX_TRAIN_SAMPLES`` samples, the spec's epoch caps, fixed seeds (results are
reproducible on one machine). On a CUDA job the training runs on the GPU, on a copy of the program; the trained
values are written back into the program, which is saved from the CPU as it came.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from app.jobs.spec import Finetune, PruneGradient, PruneRegularized
from worker.compress import evaluate
from worker.compress.pruning import step_masks
from worker.compress.pt2_format import (
    _check_runs,
    _fixed_batch,
    _InputBinder,
    _load,
    _prunable_weights,
    _reduction_axis,
    _save,
    _write_masked,
)
from worker.compress.types import (
    MAX_TRAIN_SAMPLES,
    CompressionError,
    EvalData,
    StepContext,
    StepReport,
    torch_errors,
)

HOLDOUT_SHARE = 0.2
MIN_SAMPLES_FOR_HOLDOUT = 50  # below this, before/after are measured on the training data itself
SALIENCY_BATCH = 32
EVAL_BATCH = 256
SEED = 0

Objective = Literal["labels", "distill", "teacher_top1", "output_sensitivity"]


@dataclass
class Program:
    """An exported program's module with its input binding: forward on sample indices of the job's data."""

    ep: ExportedProgram
    data: EvalData
    device: str = "cpu"
    module: torch.fx.GraphModule = field(init=False)
    fixed_batch: int | None = field(init=False)

    def __post_init__(self) -> None:
        if self.device == "cuda":
            # A copy moves to the GPU: the program itself stays on the CPU, where it is saved; write_back copies
            # the trained values into it. (copy.deepcopy of an ExportedProgram breaks its input names.)
            from torch.export.passes import move_to_device_pass

            buffer = io.BytesIO()
            torch.export.save(self.ep, buffer)
            buffer.seek(0)
            self.module = move_to_device_pass(torch.export.load(buffer), "cuda").module()
        else:
            self.module = self.ep.module()
        self.fixed_batch = _fixed_batch(self.ep)
        self._binder = _InputBinder(self.ep)

    def forward(self, idx: np.ndarray, data: EvalData | None = None) -> list[torch.Tensor]:
        """Outputs on the samples ``idx`` of ``data`` (default: the data the program is bound to and trains on)."""
        inputs = (data or self.data).inputs
        args, kwargs = self._binder.bind({k: v[idx] for k, v in inputs.items()}, self.device)
        return [t for t in pytree.tree_leaves(self.module(*args, **kwargs)) if isinstance(t, torch.Tensor)]

    def outputs(self, idx: np.ndarray, data: EvalData | None = None) -> list[np.ndarray]:
        """Outputs on the samples ``idx`` of ``data`` (a fixed batch is padded as the evaluation does)."""
        real = len(idx)
        chunks: list[list[np.ndarray]] = []
        bs = self.fixed_batch or EVAL_BATCH
        with torch.no_grad():
            for start in range(0, real, bs):
                part = idx[start : start + bs]
                n = len(part)
                if self.fixed_batch and n < self.fixed_batch:
                    part = np.concatenate([part, np.repeat(part[:1], self.fixed_batch - n)])
                chunks.append([t.detach().float().cpu().numpy()[:n] for t in self.forward(part, data)])
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.is_floating_point()}

    def write_back(self) -> None:
        """Copy the module's parameter values into the program's state_dict (same names)."""
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                target = self.ep.state_dict.get(name)
                if isinstance(target, torch.Tensor) and target.shape == p.shape:
                    target.copy_(p.detach().to(target.dtype))


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    measure: np.ndarray
    held_out: bool

    def describe(self) -> str:
        if self.held_out:
            return (
                f"before/after measured on a held-out {len(self.measure)} samples ({HOLDOUT_SHARE:.0%} of the "
                f"job's data, fixed seed); trained on the other {len(self.train)}. The job's final metrics use "
                "the whole dataset, training samples included."
            )
        return (
            f"before/after measured on the {len(self.measure)} training samples themselves (under "
            f"{MIN_SAMPLES_FOR_HOLDOUT} samples: no hold-out); the job's final metrics use the same data."
        )


def split(n: int) -> Split:
    """A seeded hold-out of ``HOLDOUT_SHARE`` for the before/after numbers; the rest trains (capped)."""
    order = np.random.default_rng(SEED).permutation(n)
    if n < MIN_SAMPLES_FOR_HOLDOUT:
        return Split(order[:MAX_TRAIN_SAMPLES], order, False)
    cut = max(1, round(n * HOLDOUT_SHARE))
    return Split(order[cut:][:MAX_TRAIN_SAMPLES], np.sort(order[:cut]), True)


@dataclass(frozen=True)
class TrainingPlan:
    """What a training step trains on (``train`` at ``train_idx``, the original's outputs there as ``teacher``)
    and where it measures before/after (``measure`` at ``measure_idx``, the original's outputs there as
    ``reference``); ``notes`` say which data was used where that is not the default split."""

    train: EvalData
    train_idx: np.ndarray
    teacher: list[np.ndarray] | None
    measure: EvalData
    measure_idx: np.ndarray
    reference: list[np.ndarray] | None
    measured_on: str
    notes: list[str]


def training_plan(ctx: StepContext, what: str) -> TrainingPlan:
    """80% / 20% of the job's dataset; or, with a train dataset, all of it to train and all of the dataset to
    measure (the two are the user's own split, so no sample is held back)."""
    if ctx.data is None:
        raise CompressionError("dataset_required", f"{what} trains on the job's dataset; the job has none")
    if ctx.train_data is None:
        parts = split(ctx.data.num_samples)
        return TrainingPlan(
            ctx.data, parts.train, ctx.reference, ctx.data, parts.measure, ctx.reference, parts.describe(), []
        )
    train, measure = ctx.train_data, ctx.data
    n_train = min(train.num_samples, MAX_TRAIN_SAMPLES)
    return TrainingPlan(
        train,
        np.arange(n_train),
        ctx.train_reference,
        measure,
        np.arange(measure.num_samples),
        ctx.reference,
        f"before/after measured on all {measure.num_samples} samples of the job's dataset (dataset_id); trained on "
        f"{n_train} samples of its train dataset (train_dataset_id). The job's final metrics use dataset_id.",
        [
            f"{what} trained on the job's train dataset (train_dataset_id, {n_train} samples); its "
            f"before/after and the job's metrics are measured on dataset_id ({measure.num_samples} samples)."
        ],
    )


@dataclass(frozen=True)
class Targets:
    objective: Objective
    labels: np.ndarray | None
    teacher: list[np.ndarray] | None
    temperature: float = 1.0


def targets_for(
    method: Literal["labels", "distill", "auto", "saliency"],
    data: EvalData,
    reference: list[np.ndarray] | None,
    temperature: float = 1.0,
) -> Targets:
    """What a training step fits. ``auto``: labels when the data has them, else distillation. ``saliency``: labels,
    else the original's top-1 class for logits, else the output's sensitivity (see ``saliency``)."""
    has_logits = reference is not None and reference[0].ndim == 2
    labels_usable = data.labels is not None and data.labels.ndim == 1
    if method == "labels" or (method in ("auto", "saliency") and labels_usable):
        if not labels_usable:
            raise CompressionError("labels_required", "training on labels needs a dataset with a `labels` array")
        if reference is not None and reference[0].ndim != 2:
            raise CompressionError(
                "unsupported_model",
                f"training on labels needs logits [N, classes] as the first output; it has {reference[0].ndim} dims",
            )
        return Targets("labels", data.labels, None)
    if reference is None:
        raise CompressionError("dataset_required", "training needs the job's dataset and the original's outputs on it")
    if method == "saliency":
        return Targets("teacher_top1" if has_logits else "output_sensitivity", None, reference)
    return Targets("distill", None, reference, temperature)


def _loss(outputs: list[torch.Tensor], idx: np.ndarray, targets: Targets, gen: torch.Generator) -> torch.Tensor:
    device = outputs[0].device
    if targets.objective == "labels":
        assert targets.labels is not None
        return F.cross_entropy(outputs[0].float(), torch.from_numpy(targets.labels[idx]).long().to(device))
    assert targets.teacher is not None
    if targets.objective == "teacher_top1":
        top1 = torch.from_numpy(targets.teacher[0][idx].argmax(axis=1)).to(device)
        return F.cross_entropy(outputs[0].float(), top1)
    if targets.objective == "output_sensitivity":
        # <f(x), r> with r ~ N(0, I): E_r[(w * dL/dw)^2] = ||w * df/dw||^2, the squared first-order change of the
        # output when w is zeroed. The distillation loss itself has zero gradient at the start (student = teacher).
        out = outputs[0].float()
        return (out * torch.randn(out.shape, generator=gen).to(device)).sum() / len(idx)
    total = torch.zeros((), device=device)
    for i, (out, ref) in enumerate(zip(outputs, targets.teacher, strict=False)):
        if not out.is_floating_point() or tuple(out.shape[1:]) != ref.shape[1:]:
            continue
        teacher = torch.from_numpy(np.ascontiguousarray(ref[idx])).float().to(device)
        if i == 0 and out.dim() == 2:
            # Hinton et al.: KL(teacher || student) on temperature-softened distributions, scaled by T^2.
            t = targets.temperature
            total = total + F.kl_div(
                F.log_softmax(out.float() / t, dim=1),
                F.log_softmax(teacher / t, dim=1),
                log_target=True,
                reduction="batchmean",
            ) * (t * t)
        else:
            total = total + F.mse_loss(out.float(), teacher)
    return total


def _batches(idx: np.ndarray, batch_size: int, fixed: int | None, gen: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled batches; a program with a fixed batch size gets exactly that many (wrapping around)."""
    order = idx[gen.permutation(len(idx))]
    bs = fixed or batch_size
    for start in range(0, len(order), bs):
        part = order[start : start + bs]
        if fixed and len(part) < fixed:
            part = np.concatenate([part, np.resize(order, fixed - len(part))])
        yield part


def saliency(prog: Program, targets: Targets, weights: list[str], samples: int) -> tuple[dict[str, np.ndarray], int]:
    """First-order Taylor saliency |w * dL/dw| per weight, summed over batches of the first ``samples`` samples."""
    params = prog.trainable()
    missing = [w for w in weights if w not in params]
    if missing:
        raise CompressionError(
            "unsupported_model", f"weights {missing[:5]} are not trainable parameters of the program"
        )
    for p in params.values():
        p.requires_grad_(False)
    chosen = [params[w].requires_grad_(True) for w in weights]
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
    n = min(samples, prog.data.num_samples)
    gen = torch.Generator().manual_seed(SEED)
    bs = prog.fixed_batch or SALIENCY_BATCH
    idx = np.arange(n)
    for start in range(0, n, bs):
        part = idx[start : start + bs]
        if prog.fixed_batch and len(part) < prog.fixed_batch:
            part = np.concatenate([part, np.resize(idx, prog.fixed_batch - len(part))])
        grads = torch.autograd.grad(_loss(prog.forward(part), part, targets, gen), chosen, allow_unused=True)
        for score, p, g in zip(scores, chosen, grads, strict=True):
            if g is not None:
                score += (p.detach() * g).abs().float()
    for p in params.values():
        p.requires_grad_(True)
    return {w: s.cpu().numpy() for w, s in zip(weights, scores, strict=True)}, n


@dataclass
class TrainResult:
    epochs: int
    steps: int
    train_samples: int
    loss_first_epoch: float
    loss_last_epoch: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "optimizer_steps": self.steps,
            "train_samples": self.train_samples,
            "loss_first_epoch": round(self.loss_first_epoch, 6),
            "loss_last_epoch": round(self.loss_last_epoch, 6),
        }


def train(
    prog: Program,
    targets: Targets,
    train_idx: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    keep_zeros: bool = True,
    penalty: tuple[Literal["l1", "l2"], float, list[str]] | None = None,
) -> TrainResult:
    """Adam on all floating-point parameters. ``keep_zeros``: weights that are exactly zero stay zero (their
    gradients are masked and the weights re-masked after every step). ``penalty``: (kind, strength, weights)
    adds strength * sum|w| (l1) or strength * sum w^2 (l2) over the named weights."""
    torch.manual_seed(SEED)
    order_gen = np.random.default_rng(SEED)
    gen = torch.Generator().manual_seed(SEED)
    params = prog.trainable()
    for p in params.values():
        p.requires_grad_(True)
    masks = {n: p.detach() != 0 for n, p in params.items() if keep_zeros and bool((p == 0).any())}
    penalised = [params[n] for n in penalty[2]] if penalty else []
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        total, batches = 0.0, 0
        for idx in _batches(train_idx, batch_size, prog.fixed_batch, order_gen):
            opt.zero_grad(set_to_none=True)
            loss = _loss(prog.forward(idx), idx, targets, gen)
            if penalty is not None:
                kind, strength, _ = penalty
                reg = sum((p.abs().sum() if kind == "l1" else (p * p).sum()) for p in penalised)
                loss = loss + strength * reg
            value = loss.item()
            if not math.isfinite(value):
                raise CompressionError("training_diverged", f"the training loss became {value}; lower the lr")
            loss.backward()
            for name, mask in masks.items():
                if params[name].grad is not None:
                    params[name].grad.mul_(mask)
            opt.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    params[name].mul_(mask)
            total, batches, steps = total + value, batches + 1, steps + 1
        losses.append(total / max(batches, 1))
    for p in params.values():
        p.requires_grad_(False)
    prog.write_back()
    return TrainResult(epochs, steps, len(train_idx), losses[0], losses[-1])


def quality(
    prog: Program, data: EvalData, idx: np.ndarray, reference: list[np.ndarray] | None
) -> dict[str, float | None]:
    """Accuracy (with labels and logits) and fidelity to the original (cosine, top-1 agreement) on the samples
    ``idx`` of ``data`` (``reference``: the original's outputs on ``data``)."""
    outputs = prog.outputs(idx, data)
    labels = data.labels[idx] if data.labels is not None else None
    result: dict[str, float | None] = {"accuracy": evaluate.accuracy(outputs, labels)}
    if reference is not None:
        fid = evaluate.compare([r[idx] for r in reference], outputs, labels)
        result["cosine"], result["agreement"] = fid["cosine"], fid["agreement"]
    return result


def sparsity(prog: Program) -> tuple[int, int]:
    """(zeros, total) over the floating-point parameters."""
    zeros = total = 0
    for p in prog.trainable().values():
        total += p.numel()
        zeros += p.numel() - int(torch.count_nonzero(p.detach()))
    return zeros, total


def rounded(values: dict[str, float | None], suffix: str) -> dict[str, float | None]:
    return {f"{k}_{suffix}": None if v is None else round(v, 6) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------------
# Steps (Pt2Backend's prune_gradient, prune_regularized, finetune_* call these)


def prune_gradient(src: Path, dst: Path, step: PruneGradient, ctx: StepContext) -> StepReport:
    """Zero the weights with the lowest accumulated |w * dL/dw| (global or per layer, with overrides)."""
    plan = training_plan(ctx, "prune/gradient")
    ep = _load(src)
    nodes, weights = _prunable_weights(ep)
    targets = targets_for("saliency", plan.train, plan.teacher)
    with torch_errors("training_failed", "accumulating gradient saliency"):
        scores, used = saliency(Program(ep, plan.train, ctx.device), targets, list(weights), step.samples)
    masks = step_masks(
        scores,
        sparsity=step.sparsity,
        scope=step.scope,
        overrides=step.overrides,
        reduction_axes={k: _reduction_axis(node) for k, node in nodes.items()},
    )
    layers, zeros, total = _write_masked(ep, weights, masks, dst)
    details = {
        "requested": step.sparsity,
        "achieved": round(zeros / total, 6),
        "scope": step.scope,
        "overrides": dict(step.overrides),
        "saliency_samples": used,
        "saliency_targets": _TARGET_WORDS[targets.objective],
        "prunable_parameters": total,
        "zeros": zeros,
        "layers": layers,
    }
    notes = []
    if ctx.train_data is not None:
        notes.append(f"prune/gradient: saliency accumulated on {used} samples of the train dataset (train_dataset_id).")
    return StepReport(op="prune", method="gradient", details=details, notes=notes)


def prune_regularized(src: Path, dst: Path, step: PruneRegularized, ctx: StepContext) -> StepReport:
    """Train with an L1/L2 penalty on the prunable weights (zeros kept), then zero the smallest to ``sparsity``."""
    plan = training_plan(ctx, "prune/regularized")
    ep = _load(src)
    nodes, _ = _prunable_weights(ep)
    targets = targets_for("auto", plan.train, plan.teacher, temperature=2.0)
    with torch_errors("training_failed", "prune/regularized training"):
        prog = Program(ep, plan.train, ctx.device)
        before = quality(prog, plan.measure, plan.measure_idx, plan.reference)
        result = train(
            prog,
            targets,
            plan.train_idx,
            epochs=step.epochs,
            lr=step.lr,
            batch_size=step.batch_size,
            penalty=(step.penalty, step.strength, list(nodes)),
        )
        trained = quality(prog, plan.measure, plan.measure_idx, plan.reference)
    _, weights = _prunable_weights(ep)  # the trained values, written back into the program
    masks = step_masks(
        {k: np.abs(t.detach().float().cpu().numpy()) for k, t in weights.items()},
        sparsity=step.sparsity,
        scope=step.scope,
    )
    layers, zeros, total = _write_masked(ep, weights, masks, dst)
    after = quality(Program(_load(dst), plan.train, ctx.device), plan.measure, plan.measure_idx, plan.reference)
    details = {
        "requested": step.sparsity,
        "achieved": round(zeros / total, 6),
        "scope": step.scope,
        "penalty": step.penalty,
        "strength": step.strength,
        "lr": step.lr,
        "batch_size": step.batch_size,
        "objective": _TARGET_WORDS[targets.objective],
        **result.as_dict(),
        **rounded(before, "before"),
        **rounded(trained, "trained"),
        **rounded(after, "after"),
        "measured_on": plan.measured_on,
        "prunable_parameters": total,
        "zeros": zeros,
        "layers": layers,
    }
    notes = [
        *plan.notes,
        "prune/regularized: *_before is the input model, *_trained after the penalised training, *_after after "
        "thresholding to the requested sparsity. Add a finetune step to recover accuracy lost at the threshold.",
    ]
    return StepReport(op="prune", method="regularized", details=details, notes=notes)


def finetune(src: Path, dst: Path, step: Finetune, ctx: StepContext) -> StepReport:
    """Recover accuracy: train on labels or distil from the original; exact zeros stay zero."""
    ep = _load(src)

    def save() -> None:
        _save(ep, dst)
        _check_runs(dst)

    return finetune_steps(
        step,
        ctx,
        build=lambda data: Program(ep, data, ctx.device),
        save=save,
        reload=lambda data: Program(_load(dst), data, ctx.device),
    )


def finetune_steps(
    step: Finetune,
    ctx: StepContext,
    *,
    build: Callable[[EvalData], Any],
    save: Callable[[], None],
    reload: Callable[[EvalData], Any],
) -> StepReport:
    """The fine-tuning step on any model with ``Program``'s interface (``build`` makes it on the training data,
    ``save`` writes and checks the trained model, ``reload`` reads the written one back): train, then measure
    before/after (``training_plan``) and confirm the zeros are where they were. Shared by the pt2 and hf backends."""
    plan = training_plan(ctx, f"finetune/{step.method}")
    targets = targets_for(step.method, plan.train, plan.teacher, step.temperature)
    with torch_errors("training_failed", f"finetune/{step.method}"):
        prog = build(plan.train)
        zeros_before, total = sparsity(prog)
        before = quality(prog, plan.measure, plan.measure_idx, plan.reference)
        result = train(prog, targets, plan.train_idx, epochs=step.epochs, lr=step.lr, batch_size=step.batch_size)
        save()
    tuned = reload(plan.train)
    zeros_after, _ = sparsity(tuned)
    after = quality(tuned, plan.measure, plan.measure_idx, plan.reference)
    if zeros_after != zeros_before:  # masks make this impossible; a broken invariant must not pass silently
        raise CompressionError("internal_error", f"fine-tuning changed the zeros: {zeros_before} -> {zeros_after}")
    details = {
        "objective": _TARGET_WORDS[targets.objective],
        "lr": step.lr,
        "batch_size": step.batch_size,
        **({"temperature": step.temperature} if step.method == "distill" else {}),
        **result.as_dict(),
        **rounded(before, "before"),
        **rounded(after, "after"),
        "measured_on": plan.measured_on,
        "sparsity_before": round(zeros_before / total, 6) if total else 0.0,
        "sparsity_after": round(zeros_after / total, 6) if total else 0.0,
        "zeros": zeros_after,
    }
    return StepReport(op="finetune", method=step.method, details=details, notes=plan.notes)


_TARGET_WORDS: dict[Objective, str] = {
    "labels": "labels (cross-entropy)",
    "distill": "distillation from the original's outputs (KL on logits, MSE on other outputs)",
    "teacher_top1": "the original's top-1 class (the dataset has no labels)",
    "output_sensitivity": "output sensitivity to each weight (no labels and no logits)",
}
