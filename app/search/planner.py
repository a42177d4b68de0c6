"""The accuracy-aware search's decisions, as a pure function of the trials so far.

Nothing here touches the database or a queue: ``plan`` takes the search spec, the model's format and what each
trial (an ordinary compression job) produced, and returns the trials to start next, the ones it skips and why,
and whether the search is finished. Because the decision is recomputed from the trials every time, the
coordinator keeps no state of its own: any worker can advance a search after any other one died.

The strategy, cheap before dear:
1. Anchors: each quantization method alone, plus magnitude pruning at the middle level alone (that trial also
   measures each layer's sensitivity). All in parallel.
2. For every quantization line (none, int8_dynamic, ...) whose anchor meets the constraint, bisect the sparsity
   levels for the highest one that still meets it (accuracy falls with sparsity), one probe per line at a time,
   lines in parallel. A line that cannot beat the best trial so far even at its highest level is skipped.
3. Refinements once a line's boundary is known: mixed per-layer sparsity from the measured sensitivity (the most
   sensitive quarter of the layers stays at the last good level, the rest goes to the first failing one), a
   distillation fine-tune at the first failing level where the format offers one, N:M patterns and structured
   levels when asked for.
Pruned weights only shrink a file when they are stored sparsely, so for the size objective pruned recipes end
with the squeeze encoding where the format has it; without it, pruning cannot lower the size and is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import TypeAdapter

from app.jobs.capabilities import CAPABILITIES, plan_formats
from app.jobs.spec import STEP_TYPES, Step
from app.search.schemas import SearchSpec

DEFAULT_SPARSITY = (0.5, 0.7, 0.8, 0.9, 0.95)
QUANT_ORDER = ("int8_static", "int8_dynamic", "int8_weight_only", "int4_weight_only", "fp16", "bf16")
ENCODE = {"op": "encode", "method": "squeeze"}
TERMINAL = ("succeeded", "failed", "cancelled")
# Without a measured size for a quantization alone, no prediction is made (nothing is skipped on a guess). With
# it, a pruned and encoded recipe is taken to be at best this share of (1 - sparsity) of that size: an encoder
# cannot store fewer bytes than the surviving values, and entropy coding of those is credited up to 2x.
ENTROPY_CREDIT = 0.5


@dataclass(frozen=True)
class Recipe:
    """One point of the search space: a quantization (or none), a sparsity, and how it is reached."""

    quantize: str | None
    sparsity: float = 0.0
    mode: str = "magnitude"  # magnitude | mixed | finetune | pattern | structured | encoded (quantized, no pruning)
    pattern: str | None = None
    overrides: tuple[tuple[str, float], ...] = ()
    exclude: tuple[str, ...] = ()  # layers the quantization leaves in float (mixed precision)

    @property
    def line(self) -> str:
        return self.quantize or "none"

    def label(self) -> str:
        parts = []
        if self.mode == "structured":
            parts.append(f"structured {self.sparsity:g}")
        elif self.mode == "pattern":
            parts.append(f"{self.pattern} sparsity")
        elif self.sparsity:
            parts.append(f"prune {self.sparsity:g}" + (" (per-layer from sensitivity)" if self.mode == "mixed" else ""))
            if self.mode == "finetune":
                parts.append("finetune")
        if self.quantize:
            kept = f" ({len(self.exclude)} most sensitive layer(s) kept float)" if self.exclude else ""
            parts.append(self.quantize + kept)
        if self.mode == "encoded":
            parts.append("squeeze encoding")
        return " + ".join(parts) or "unchanged"


@dataclass(frozen=True)
class TrialView:
    """What the planner needs of a trial job."""

    job_id: str | None
    steps: list[dict[str, Any]]
    status: str  # a job status, or "skipped"
    metrics: dict[str, Any] | None = None


@dataclass
class Decision:
    start: list[tuple[Recipe, list[dict[str, Any]]]] = field(default_factory=list)
    skipped: list[tuple[Recipe, str]] = field(default_factory=list)
    finished: bool = False


def steps_for(recipe: Recipe, fmt: str, spec: SearchSpec) -> list[dict[str, Any]] | None:
    """The job steps of a recipe, or None when the model's format cannot run them."""
    steps: list[dict[str, Any]] = []
    if recipe.mode == "structured":
        steps.append({"op": "prune", "method": "structured", "sparsity": recipe.sparsity})
    elif recipe.mode == "pattern":
        steps.append({"op": "prune", "method": "magnitude", "pattern": recipe.pattern})
    elif recipe.sparsity > 0:
        prune: dict[str, Any] = {"op": "prune", "method": "magnitude", "sparsity": recipe.sparsity}
        if recipe.overrides:
            prune["overrides"] = dict(recipe.overrides)
        steps.append(prune)
        if recipe.mode == "finetune":
            steps.append({"op": "finetune", "method": "distill"})
    if recipe.quantize:
        quantize: dict[str, Any] = {"op": "quantize", "method": recipe.quantize}
        if recipe.exclude:
            quantize["exclude"] = list(recipe.exclude)
        if recipe.quantize in MIXED_PRECISION and spec.objective == "size" and _takes(fmt, recipe.quantize, "include"):
            quantize["include"] = ["embedding"]
        steps.append(quantize)
    sparse = recipe.mode != "structured" and (recipe.sparsity > 0 or recipe.pattern)
    if steps and (sparse or recipe.mode == "encoded") and _encode(fmt, spec):
        steps.append(dict(ENCODE))
    elif recipe.mode == "encoded":
        return None
    return steps if steps and _runs(fmt, steps) else None


_STEPS = TypeAdapter(list[Step])


def normalized(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps as a job stores them (defaults filled in), so a planned recipe and its trial compare equal."""
    return _STEPS.dump_python(_STEPS.validate_python(steps), mode="json")  # type: ignore[no-any-return]


def recipe_key(steps: list[dict[str, Any]]) -> str:
    return json.dumps(normalized(steps), sort_keys=True, separators=(",", ":"))


def recipe_of(steps: list[dict[str, Any]]) -> Recipe:
    """Read a trial's recipe back from its steps (the planner's only memory is the trials themselves)."""
    quant_step = next((s for s in steps if s.get("op") == "quantize"), None)
    quantize = quant_step["method"] if quant_step else None
    exclude = tuple((quant_step or {}).get("exclude") or ())
    prune = next((s for s in steps if s.get("op") == "prune"), None)
    if prune is None:
        encoded = any(s.get("op") == "encode" for s in steps)
        return Recipe(quantize, mode="encoded" if encoded else "magnitude", exclude=exclude)
    if prune.get("method") == "structured":
        return Recipe(quantize, prune["sparsity"], "structured")
    if prune.get("pattern"):
        return Recipe(quantize, 0.0, "pattern", pattern=prune["pattern"])
    overrides = tuple(sorted((prune.get("overrides") or {}).items()))
    mode = "mixed" if overrides else "finetune" if any(s.get("op") == "finetune" for s in steps) else "magnitude"
    return Recipe(quantize, float(prune["sparsity"]), mode, overrides=overrides)


def probe_recipe(levels: list[float]) -> Recipe:
    """The pruning-only anchor: the middle level. Its job also measures each layer's sensitivity."""
    return Recipe(None, levels[len(levels) // 2])


def quantize_options(fmt: str, spec: SearchSpec) -> list[str]:
    offered = CAPABILITIES.get(fmt, {}).get("quantize", {})
    wanted = spec.space.quantize if spec.space.quantize is not None else list(QUANT_ORDER)
    return [q for q in wanted if q in offered]


def sparsity_levels(spec: SearchSpec) -> list[float]:
    return sorted(set(spec.space.sparsity if spec.space.sparsity is not None else DEFAULT_SPARSITY))


def objective(spec: SearchSpec, metrics: dict[str, Any] | None) -> float | None:
    result = (metrics or {}).get("result")
    if not result:
        return None
    if spec.objective == "size":
        return float(result["size_bytes"])
    latency = result.get("latency_ms") or {}
    return float(latency["p50"]) if "p50" in latency else None


def violation(spec: SearchSpec, metrics: dict[str, Any] | None) -> float | None:
    """How far a trial is from the constraint: <= 0 meets it; None when it was not measured."""
    base, result = (metrics or {}).get("baseline"), (metrics or {}).get("result")
    if not base or not result:
        return None
    c = spec.constraint
    if c.max_accuracy_drop is not None:
        if base.get("accuracy") is None or result.get("accuracy") is None:
            return None
        return round(base["accuracy"] - result["accuracy"] - c.max_accuracy_drop, 9)
    if result.get("cosine") is None:
        return None
    assert c.min_cosine is not None
    return round(c.min_cosine - result["cosine"], 9)


def plan(spec: SearchSpec, fmt: str, trials: list[TrialView], *, out_of_time: bool, parallel: int = 1) -> Decision:
    """The next trials to start, those skipped, and whether the search is over.

    ``parallel``: worker slots free for the search. A line's open interval is then probed at that many levels at
    once (a k-ary instead of a binary split), which shortens the sequential part of the search.
    """
    by_key = {recipe_key(t.steps): t for t in trials}
    done = {k: t for k, t in by_key.items() if t.status in TERMINAL}
    pending = [t for t in by_key.values() if t.status not in TERMINAL and t.status != "skipped"]
    started = sum(1 for t in trials if t.status != "skipped")
    decision = Decision()
    if out_of_time or started >= spec.max_trials:
        decision.finished = not pending
        return decision

    best = _best_objective(spec, done.values())
    quants = quantize_options(fmt, spec)
    levels = sparsity_levels(spec)
    anchors = [Recipe(q) for q in quants]
    if levels and _pruning_can_help(fmt, spec):
        anchors.append(probe_recipe(levels))
    wanted: list[Recipe] = []
    waiting = False
    for recipe in anchors:
        state = _state(recipe, fmt, spec, by_key)
        if state == "new":
            wanted.append(recipe)
        elif state == "pending":
            waiting = True

    if _pruning_can_help(fmt, spec):
        for q in [None, *quants]:
            line_wanted, line_waiting = _line(spec, fmt, q, levels, by_key, best, parallel)
            wanted += line_wanted
            waiting = waiting or line_waiting
    for q in quants:
        recipe = _mixed_precision(spec, fmt, q, by_key)
        if recipe is not None:
            wanted.append(recipe)
    encoded, encoded_waiting = _encoded(spec, fmt, quants, by_key)
    wanted += encoded
    waiting = waiting or encoded_waiting
    for recipe in _asked_for(spec, quants, by_key, fmt):
        if _state(recipe, fmt, spec, by_key) == "new":
            wanted.append(recipe)

    budget = spec.max_trials - started
    chosen: set[str] = set()
    for recipe in wanted:
        steps = steps_for(recipe, fmt, spec)
        if steps is None or recipe_key(steps) in by_key or recipe_key(steps) in chosen:
            continue
        # A bisection probe stands for its whole line: skip it only if even the line's highest level cannot win.
        reach = replace(recipe, sparsity=levels[-1]) if recipe.mode == "magnitude" and recipe.sparsity else recipe
        floor = _predicted_floor(spec, reach, done.values())
        if best is not None and floor is not None and floor >= best:
            decision.skipped.append((recipe, f"cannot beat the best so far ({floor:.0f} >= {best:.0f})"))
            continue
        if budget <= 0:
            break
        decision.start.append((recipe, steps))
        chosen.add(recipe_key(steps))
        budget -= 1
    decision.finished = not decision.start and not pending and not waiting
    return decision


def _encode(fmt: str, spec: SearchSpec) -> bool:
    if spec.space.encode is not None:
        return spec.space.encode and _has(fmt, "encode", "squeeze")
    return spec.objective == "size" and _has(fmt, "encode", "squeeze")


def _pruning_can_help(fmt: str, spec: SearchSpec) -> bool:
    """Unstructured zeros shrink a file only when encoded, and speed nothing up on the runtimes used here."""
    return spec.objective == "size" and _encode(fmt, spec)


def _has(fmt: str, op: str, method: str) -> bool:
    return method in CAPABILITIES.get(fmt, {}).get(op, {})


def _takes(fmt: str, method: str, option: str) -> bool:
    """Whether the format's quantize step ``method`` accepts ``option`` (capabilities list the ones it refuses)."""
    info = CAPABILITIES.get(fmt, {}).get("quantize", {}).get(method)
    return info is not None and option not in info.get("unsupported_options", ())


def _runs(fmt: str, steps: list[dict[str, Any]]) -> bool:
    class _Step:
        def __init__(self, s: dict[str, Any]) -> None:
            self.op, self.method = s["op"], s["method"]

    if any(f"{s['op']}/{s['method']}" not in STEP_TYPES for s in steps):
        return False
    return all(info is not None for _, info in plan_formats(fmt, [_Step(s) for s in steps]))


def _state(recipe: Recipe, fmt: str, spec: SearchSpec, by_key: dict[str, TrialView]) -> str:
    steps = steps_for(recipe, fmt, spec)
    if steps is None:
        return "impossible"
    trial = by_key.get(recipe_key(steps))
    if trial is None:
        return "new"
    return "done" if trial.status in TERMINAL or trial.status == "skipped" else "pending"


def _meets(spec: SearchSpec, trial: TrialView | None) -> bool | None:
    if trial is None or trial.status != "succeeded":
        return None if trial is None or trial.status not in TERMINAL else False
    v = violation(spec, trial.metrics)
    return None if v is None else v <= 0


def _trial(recipe: Recipe, fmt: str, spec: SearchSpec, by_key: dict[str, TrialView]) -> TrialView | None:
    steps = steps_for(recipe, fmt, spec)
    return by_key.get(recipe_key(steps)) if steps is not None else None


def split_points(levels: list[float], k: int) -> list[float]:
    """``k`` levels that cut ``levels`` into k + 1 near-equal parts (k = 1: the middle one, as bisection)."""
    k = max(1, min(k, len(levels)))
    return sorted({levels[(i * (len(levels) + 1)) // (k + 1) - 1] for i in range(1, k + 1)})


def _bounds(
    spec: SearchSpec, fmt: str, q: str | None, levels: list[float], by_key: dict[str, TrialView]
) -> tuple[float, float | None, bool]:
    """(highest level known to meet the constraint, lowest known to miss it, a probe still running) on a line."""
    good, bad, pending = [0.0], [], False
    for level in levels:
        t = _trial(Recipe(q, level), fmt, spec, by_key)
        if t is None:
            continue
        if t.status not in TERMINAL:
            pending = True
            continue
        (good if _meets(spec, t) else bad).append(level)
    return max(good), (min(bad) if bad else None), pending


def _line(
    spec: SearchSpec,
    fmt: str,
    q: str | None,
    levels: list[float],
    by_key: dict[str, TrialView],
    best: float | None,
    parallel: int = 1,
) -> tuple[list[Recipe], bool]:
    """Bisection over the sparsity levels of one quantization line, then its refinements.

    Pruning alone (the "none" line) is bisected first. A quantized line starts at the level pruning alone could
    bear and never goes above the first level pruning alone could not: quantization adds loss, it does not
    remove any. That keeps a search to a few trials per line instead of a full bisection each.
    """
    lo_none, hi_none, pending_none = _bounds(spec, fmt, None, levels, by_key)
    if q is not None:
        anchor = _trial(Recipe(q), fmt, spec, by_key)
        if anchor is None or anchor.status not in TERMINAL:
            return [], anchor is not None
        if not _meets(spec, anchor):
            return [], False  # quantization alone already breaks the constraint: pruning only adds loss
        if pending_none or [s for s in levels if s > lo_none and (hi_none is None or s < hi_none)]:
            return [], True  # wait for pruning alone to find its boundary
    lo, hi, pending = _bounds(spec, fmt, q, levels, by_key)
    if pending:
        return [], True
    if q is not None and hi_none is not None:
        hi = hi_none if hi is None else min(hi, hi_none)
    between = [s for s in levels if s > lo and (hi is None or s < hi)]
    if between:
        if q is not None and lo == 0.0 and lo_none in between:
            return [Recipe(q, lo_none)], False
        return [Recipe(q, level) for level in split_points(between, parallel)], False
    out: list[Recipe] = []
    if hi is not None and lo > 0.0:
        # Refinements are tried on pruning alone first; a quantized line repeats only those that met the budget.
        mixed = _mixed(q, lo, hi, by_key) if spec.space.mixed else None
        if mixed is not None and _state(mixed, fmt, spec, by_key) == "new" and _refined_ok(spec, fmt, mixed, by_key):
            out.append(mixed)
        want_finetune = spec.space.finetune if spec.space.finetune is not None else True
        if want_finetune and _has(fmt, "finetune", "distill"):
            tuned = Recipe(q, hi, "finetune")
            if not _refined_ok(spec, fmt, tuned, by_key):
                pass
            elif _state(tuned, fmt, spec, by_key) == "new":
                out.append(tuned)
            elif _meets(spec, _trial(tuned, fmt, spec, by_key)):
                above = [s for s in levels if s > hi]
                if above and _state(Recipe(q, above[0], "finetune"), fmt, spec, by_key) == "new":
                    out.append(Recipe(q, above[0], "finetune"))
    return out, False


MIXED_PRECISION = ("int8_weight_only", "int4_weight_only")  # the methods whose steps take ``exclude``
# Weight-only steps leave embedding tables in float unless asked (``include``); for the size objective the search
# asks, where the format's step takes ``include`` (MiniLM: the table is half of its int8 bytes).


def _encoded(spec: SearchSpec, fmt: str, quants: list[str], by_key: dict[str, TrialView]) -> tuple[list[Recipe], bool]:
    """The smallest quantization that meets the budget without pruning, then stored with the squeeze encoding.

    The encoding stores an int8 or int4 model's codes exactly (entropy coding); weights the quantization left in
    float are requantized at 8 bits, so the trial is measured against the constraint like any other. One trial per
    search, for the smallest only: it saves bytes, never accuracy, and pruned recipes (often far smaller) need the
    trial budget more. Returns (recipes to start, one still running)."""
    if not _encode(fmt, spec):
        return [], False
    meeting = []
    for q in quants:
        anchor = _trial(Recipe(q), fmt, spec, by_key)
        if anchor is None or anchor.status not in (*TERMINAL, "skipped"):
            return [], anchor is not None  # which is smallest is known once every quantization alone is measured
        if _meets(spec, anchor):
            meeting.append((objective(spec, anchor.metrics) or float("inf"), q))
    if not meeting:
        return [], False
    q = min(meeting)[1]
    state = _state(Recipe(q, mode="encoded"), fmt, spec, by_key)
    return ([Recipe(q, mode="encoded")], False) if state == "new" else ([], state == "pending")


def _mixed_precision(spec: SearchSpec, fmt: str, q: str, by_key: dict[str, TrialView]) -> Recipe | None:
    """When a quantization alone misses the budget: the same with its most sensitive layers kept in float.

    Sensitivity comes from the anchor trial itself (each layer quantized alone, measured). First the most
    sensitive quarter of the layers, then half; nothing once one of them meets the budget or both missed.
    """
    if q not in MIXED_PRECISION or not spec.space.mixed:
        return None
    anchor = _trial(Recipe(q), fmt, spec, by_key)
    if anchor is None or anchor.status != "succeeded" or _meets(spec, anchor) is not False:
        return None
    rows = ((anchor.metrics or {}).get("baseline") or {}).get("layers") or []
    sensitivity = {r["name"]: r["sensitivity"] for r in rows if r.get("sensitivity") is not None}
    if len(sensitivity) < 2:
        return None
    ranked = sorted(sensitivity, key=lambda name: sensitivity[name])
    for share in (4, 2):
        recipe = Recipe(q, exclude=tuple(sorted(ranked[: max(1, len(ranked) // share)])))
        state = _state(recipe, fmt, spec, by_key)
        if state == "new":
            return recipe
        if state == "pending" or _meets(spec, _trial(recipe, fmt, spec, by_key)):
            return None
    return None


def _refined_ok(spec: SearchSpec, fmt: str, recipe: Recipe, by_key: dict[str, TrialView]) -> bool:
    """A refinement on a quantized line is worth a trial only if the same one met the budget without quantization."""
    if recipe.quantize is None:
        return True
    return bool(_meets(spec, _trial(replace(recipe, quantize=None), fmt, spec, by_key)))


def _mixed(q: str | None, lo: float, hi: float, by_key: dict[str, TrialView]) -> Recipe | None:
    """Per-layer sparsity from the sensitivity a pruning trial measured: the most sensitive layers stay at ``lo``."""
    sensitivity: dict[str, float] = {}
    for t in by_key.values():
        for row in ((t.metrics or {}).get("baseline") or {}).get("layers") or []:
            if row.get("sensitivity") is not None:
                sensitivity[row["name"]] = row["sensitivity"]
        if sensitivity:
            break
    if len(sensitivity) < 2:
        return None
    ranked = sorted(sensitivity, key=lambda name: sensitivity[name])  # most negative (most sensitive) first
    keep = ranked[: max(1, len(ranked) // 4)]
    return Recipe(q, hi, "mixed", overrides=tuple(sorted((name, lo) for name in keep)))


def _asked_for(spec: SearchSpec, quants: list[str], by_key: dict[str, TrialView], fmt: str) -> list[Recipe]:
    """N:M patterns and structured levels, on the lines whose quantization alone meets the constraint."""
    lines: list[str | None] = [None]
    for q in quants:
        if _meets(spec, _trial(Recipe(q), fmt, spec, by_key)):
            lines.append(q)
    structured = spec.space.structured
    if not structured and spec.objective == "latency" and _has(fmt, "prune", "structured"):
        structured = [0.25, 0.5]  # removed channels are the lever on latency; zeros are not
    out = [Recipe(q, 0.0, "pattern", pattern=p) for q in lines for p in spec.space.patterns]
    out += [Recipe(q, s, "structured") for q in lines for s in sorted(structured)]
    return out


def _best_objective(spec: SearchSpec, trials: Any) -> float | None:
    values = [
        objective(spec, t.metrics)
        for t in trials
        if t.status == "succeeded" and (v := violation(spec, t.metrics)) is not None and v <= 0
    ]
    values = [v for v in values if v is not None]
    return min(values) if values else None


def _predicted_floor(spec: SearchSpec, recipe: Recipe, done: Any) -> float | None:
    """A lower bound on the recipe's objective from measured trials, or None (never skip on a guess)."""
    if spec.objective != "size" or recipe.mode == "structured":
        return None
    alone = next(
        (t for t in done if t.status == "succeeded" and recipe_of(t.steps) == Recipe(recipe.quantize)),
        None,
    )
    size = objective(spec, alone.metrics) if alone is not None else None
    if size is None:
        if recipe.quantize is not None:
            return None
        base = next((t.metrics["baseline"] for t in done if t.metrics and t.metrics.get("baseline")), None)
        size = float(base["size_bytes"]) if base else None
        if size is None:
            return None
    if recipe.mode == "encoded":
        return size * ENTROPY_CREDIT
    sparsity = 0.5 if recipe.mode == "pattern" else recipe.sparsity
    return size * (1 - sparsity) * ENTROPY_CREDIT if sparsity else size
