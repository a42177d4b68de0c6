"""Accuracy-aware searches: a job of kind ``search`` whose trials are ordinary compression jobs.

The coordinator keeps no state outside SQL. ``advance_search`` is run by a worker whenever one of the search's
trials ends (and by the reconciler's periodic re-send as a safety net); it reads the trials, asks the pure
planner (``app.search.planner``) what to do, records new trials as jobs (cached, owned and cancellable like any
other, with ``parent_id`` set) and returns their ids to enqueue after the commit. Trials spread over every worker
that listens on the queue, so N workers run N trials at once. Racing advances are harmless: a trial's recipe is
unique per search (a unique constraint), and only one advance can move the search to its final state.

Celery's own group/chord is not used: a chord needs a result backend and keeps its state in the broker, which a
Redis restart loses; here the database stays the one source of truth.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import InvalidSpec, NotFound, SqueezeError
from app.jobs import service as jobs
from app.jobs.capabilities import CAPABILITIES
from app.jobs.events import add_event
from app.jobs.spec import Finetune, JobSpec, trains
from app.ownership import get_owned
from app.search import planner
from app.search.schemas import SearchDetails, SearchResult, SearchSpec, TrialPublic
from app.tables import Artifact, CompressionJob, DatasetUpload, ModelUpload, User, utcnow
from app.webhooks import check_notify_url, queue_delivery
from app.workers.service import list_workers

log = logging.getLogger("squeeze.search")


def create_search(session: Session, settings: Settings, *, spec: SearchSpec, user: User) -> CompressionJob:
    """Validate and record a search (status queued); the caller enqueues it after the commit."""
    model = get_owned(session, ModelUpload, spec.model_id, user, "model")
    dataset = get_owned(session, DatasetUpload, spec.dataset_id, user, "dataset")
    if spec.notify_url is not None:
        check_notify_url(spec.notify_url, settings)
    if spec.constraint.max_accuracy_drop is not None and not dataset.has_labels:
        raise InvalidSpec(
            "max_accuracy_drop compares accuracy, so the dataset needs a `labels` array; "
            "or constrain fidelity with min_cosine",
            code="labels_required",
        )
    offered = CAPABILITIES.get(model.format, {}).get("quantize", {})
    unknown = [q for q in spec.space.quantize or [] if q not in offered]
    if unknown:
        raise InvalidSpec(
            f"space.quantize: {unknown} not available for {model.format} models; offered: {sorted(offered)}",
            code="method_not_supported",
        )
    if spec.train_dataset_id is not None:
        finetunes = "distill" in CAPABILITIES.get(model.format, {}).get("finetune", {})
        if not finetunes or spec.space.finetune is False:
            raise InvalidSpec(
                "train_dataset_id is used only by the search's fine-tuning trials, and this search has none "
                + ("(space.finetune is false)" if finetunes else f"({model.format} models have no finetune/distill)"),
                code="train_dataset_unused",
            )
    # A fine-tuning trial stands for every trial: the datasets fit the model and the device is offered.
    probe = JobSpec(
        model_id=model.id,
        dataset_id=dataset.id,
        train_dataset_id=spec.train_dataset_id,
        steps=[Finetune(method="distill")] if spec.train_dataset_id is not None else [],
        device=spec.device,
    )
    train_dataset = jobs.validate_spec(session, settings, spec=probe, user=user).train_dataset
    if not planner.quantize_options(model.format, spec) and not spec.space.patterns and not spec.space.structured:
        raise InvalidSpec(f"nothing to search for {model.format} models in this space", code="empty_search_space")
    body = spec.model_dump(mode="json")
    key = hashlib.sha256(json.dumps({"search": body, "at": utcnow().isoformat()}).encode()).hexdigest()
    search = CompressionJob(
        owner_id=user.id,
        model_id=model.id,
        dataset_id=dataset.id,
        train_dataset_id=train_dataset.id if train_dataset is not None else None,
        spec=body,
        kind="search",
        queue="cpu",
        cache_key=key,
        enqueued_at=utcnow(),
    )
    session.add(search)
    session.flush()
    add_event(session, search.id, "state", status="queued", queue=search.queue)
    session.commit()
    return search


def _trial_views(session: Session, search_id: str) -> list[planner.TrialView]:
    rows = session.scalars(
        select(CompressionJob).where(CompressionJob.parent_id == search_id).order_by(CompressionJob.created_at)
    ).all()
    return [planner.TrialView(r.id, list(r.spec.get("steps") or []), r.status, r.metrics) for r in rows]


def advance_search(session: Session, settings: Settings, search_id: str) -> list[tuple[str, str]]:
    """Start what the planner asks for, or finish the search. Returns (job id, queue) pairs to enqueue."""
    search = session.get(CompressionJob, search_id)
    if search is None or search.kind != "search" or search.status in jobs.TERMINAL:
        return []
    spec = SearchSpec.model_validate(search.spec)
    model = session.get(ModelUpload, search.model_id) if search.model_id else None
    owner = session.get(User, search.owner_id)
    if model is None or owner is None or search.dataset_id is None:
        _finish(session, search, spec, [], failed=("model_not_found", "the search's model or dataset was deleted"))
        return []
    now = utcnow()
    if search.status == "queued":
        search.status, search.started_at, search.stage = "running", now, "planning"
        add_event(session, search.id, "state", status="running", attempt=1, worker="search")
    started = search.started_at or now
    if started.tzinfo is None:  # SQLite returns naive datetimes; they are UTC
        started = started.replace(tzinfo=UTC)
    out_of_time = now - started > timedelta(seconds=spec.time_budget_s)
    trials = _trial_views(session, search.id)
    if out_of_time:
        _cancel_trials(session, search.id, "the search's time budget was spent")
        trials = _trial_views(session, search.id)
    slots = sum(w.concurrency for w in list_workers(session) if search.queue in w.queues)
    decision = planner.plan(spec, model.format, trials, out_of_time=out_of_time, parallel=max(1, slots))
    session.commit()  # the search's own state first: each trial below commits on its own
    to_enqueue: list[tuple[str, str]] = []
    probe = planner.probe_recipe(planner.sparsity_levels(spec))
    for recipe, steps in decision.start:
        job_spec = JobSpec.model_validate(
            {
                "model_id": model.id,
                "dataset_id": search.dataset_id,
                "steps": steps,
                "device": spec.device,
                "evaluation": {"layer_sensitivity": _sensitivity_for(recipe, probe)},
            }
        )
        if spec.train_dataset_id is not None and any(trains(step) for step in job_spec.steps):
            job_spec = job_spec.model_copy(update={"train_dataset_id": spec.train_dataset_id})
        try:
            job, needs_enqueue = jobs.create_job(session, settings, spec=job_spec, user=owner, parent_id=search.id)
        except IntegrityError:
            session.rollback()
            continue  # another advance planned this recipe a moment ago
        except SqueezeError as exc:  # e.g. the owner's concurrent-job quota: try again when a trial ends
            session.rollback()
            log.info("search %s: trial not started now: %s", search.id, exc.message)
            break
        if needs_enqueue:
            to_enqueue.append((job.id, job.queue))
        add_event(session, search.id, "log", level="info", message=f"trial {job.id}: {recipe.label()}")
    trials = _trial_views(session, search.id)
    if decision.finished and not to_enqueue:
        _finish(session, search, spec, trials, skipped=decision.skipped)
    else:
        _report_progress(session, search, spec, trials, decision.skipped)
    session.commit()
    return to_enqueue


def _sensitivity_for(recipe: planner.Recipe, probe: planner.Recipe) -> str:
    """The pruning probe always measures per-layer sensitivity (mixed sparsity uses it); each quantization alone
    measures it for small models (mixed precision uses it); other trials skip it, it costs an evaluation a layer."""
    if recipe == probe:
        return "on"
    if recipe.sparsity == 0 and recipe.mode == "magnitude" and not recipe.exclude:
        return "auto"
    return "off"


def _cancel_trials(session: Session, search_id: str, reason: str) -> None:
    rows = session.scalars(
        select(CompressionJob).where(
            CompressionJob.parent_id == search_id, CompressionJob.status.in_(("queued", "running"))
        )
    ).all()
    for job in rows:
        job.status, job.stage, job.finished_at = "cancelled", "cancelled", utcnow()
        job.error = {"code": "cancelled", "message": reason, "details": {}}
        add_event(session, job.id, "state", status="cancelled", error=job.error)


def cancel_trials(session: Session, search: CompressionJob) -> None:
    """Called when a search is cancelled: its unfinished trials stop too."""
    _cancel_trials(session, search.id, f"its search {search.id} was cancelled")


def _report_progress(
    session: Session,
    search: CompressionJob,
    spec: SearchSpec,
    trials: list[planner.TrialView],
    skipped: list[tuple[planner.Recipe, str]],
) -> None:
    done = sum(t.status in planner.TERMINAL for t in trials)
    planned = max(len(trials), 1)
    result = summarize(spec, trials, skipped)
    best = result.best.recipe if result.best else "none yet"
    stage = f"trials {done}/{planned}; best: {best}"[:64]
    progress = round(min(0.99, done / max(planned, min(spec.max_trials, planned + 1))), 4)
    session.execute(
        update(CompressionJob)
        .where(CompressionJob.id == search.id, CompressionJob.status == "running")
        .values(progress=progress, stage=stage, heartbeat_at=utcnow(), report=_report(result, skipped))
    )
    add_event(session, search.id, "progress", progress=progress, stage=stage, trials_done=done, planned=planned)


def _finish(
    session: Session,
    search: CompressionJob,
    spec: SearchSpec,
    trials: list[planner.TrialView],
    *,
    skipped: list[tuple[planner.Recipe, str]] | None = None,
    failed: tuple[str, str] | None = None,
) -> None:
    result = summarize(spec, trials, skipped or [])
    status = "failed" if failed else "succeeded"
    error = {"code": failed[0], "message": failed[1], "details": {}} if failed else None
    if not failed and not any(t.status == "succeeded" for t in trials):
        status, error = "failed", {"code": "no_trial_succeeded", "message": result.statement, "details": {}}
    now = utcnow()
    moved = session.execute(
        update(CompressionJob)
        .where(CompressionJob.id == search.id, CompressionJob.status.in_(("queued", "running")))
        .values(
            status=status,
            progress=1.0,
            stage="done",
            finished_at=now,
            error=error,
            metrics=_best_metrics(session, result),
            report=_report(result, skipped or []),
        )
    ).rowcount
    if not moved:
        return  # another advance finished it first
    pick = result.best or result.closest
    if pick is not None and pick.job_id is not None:
        for art in session.scalars(select(Artifact).where(Artifact.job_id == pick.job_id)).all():
            session.add(
                Artifact(
                    job_id=search.id,
                    owner_id=search.owner_id,
                    kind=art.kind,
                    format=art.format,
                    filename=art.filename,
                    sha256=art.sha256,
                    size_bytes=art.size_bytes,
                )
            )
    add_event(session, search.id, "log", level="info", message=result.statement)
    add_event(session, search.id, "state", status=status, error=error)
    session.flush()
    session.refresh(search)
    queue_delivery(session, search)


def _best_metrics(session: Session, result: SearchResult) -> dict[str, Any] | None:
    pick = result.best or result.closest
    if pick is None or pick.job_id is None:
        return None
    job = session.get(CompressionJob, pick.job_id)
    return job.metrics if job is not None else None


def _report(result: SearchResult, skipped: list[tuple[planner.Recipe, str]]) -> dict[str, Any]:
    return {
        "search": result.model_dump(mode="json"),
        "skipped": [{"recipe": r.label(), "reason": why} for r, why in skipped],
    }


def trial_public(spec: SearchSpec, t: planner.TrialView) -> TrialPublic:
    base = (t.metrics or {}).get("baseline") or {}
    res = (t.metrics or {}).get("result") or {}
    v = planner.violation(spec, t.metrics)
    latency = (res.get("latency_ms") or {}).get("p50")
    drop = None
    if base.get("accuracy") is not None and res.get("accuracy") is not None:
        drop = round(base["accuracy"] - res["accuracy"], 6)
    return TrialPublic(
        job_id=t.job_id,
        recipe=planner.recipe_of(t.steps).label(),
        steps=t.steps,
        status=t.status,
        accuracy=res.get("accuracy"),
        accuracy_drop=drop,
        cosine=res.get("cosine"),
        size_bytes=res.get("size_bytes"),
        latency_p50_ms=latency,
        meets_constraint=None if v is None else v <= 0,
    )


def summarize(
    spec: SearchSpec,
    trials: list[planner.TrialView],
    skipped: list[tuple[planner.Recipe, str]],
    *,
    views: list[TrialPublic] | None = None,
) -> SearchResult:
    """Best trial meeting the constraint (or the closest miss), the Pareto front and a plain statement.

    ``views``, if given, receives every trial's public row (with its Pareto flag set).
    """
    views = views if views is not None else []
    views.extend(trial_public(spec, t) for t in trials)
    measured = [
        (v, t)
        for v, t in zip(views, trials, strict=True)
        if t.status == "succeeded" and planner.objective(spec, t.metrics) is not None
    ]
    baseline = next((t.metrics["baseline"] for _, t in measured if t.metrics), None)
    metric = spec.constraint.metric
    feasible = [(v, t) for v, t in measured if v.meets_constraint]

    def obj(t: planner.TrialView) -> float:
        value = planner.objective(spec, t.metrics)
        assert value is not None
        return value

    def quality(v: TrialPublic) -> float:
        return (v.accuracy if metric == "accuracy" else v.cosine) or 0.0

    front: list[TrialPublic] = []
    for v, t in measured:
        dominated = any(
            obj(t2) <= obj(t) and quality(v2) >= quality(v) and (obj(t2) < obj(t) or quality(v2) > quality(v))
            for v2, t2 in measured
        )
        if not dominated:
            v.on_pareto_front = True
            front.append(v)
    front.sort(key=lambda v: (v.size_bytes or 0) if spec.objective == "size" else (v.latency_p50_ms or 0.0))
    bound = _bound_text(spec)
    unit = "bytes" if spec.objective == "size" else "ms p50"
    if feasible:
        best_v, best_t = min(feasible, key=lambda vt: (obj(vt[1]), -quality(vt[0])))
        base_obj = (
            (baseline or {}).get("size_bytes")
            if spec.objective == "size"
            else ((baseline or {}).get("latency_ms") or {}).get("p50")
        )
        gain = f" ({base_obj / obj(best_t):.2f}x better than the original)" if base_obj else ""
        statement = (
            f"Best meeting {bound}: {best_v.recipe}: {obj(best_t):,.4g} {unit}{gain}, {metric} "
            f"{quality(best_v):.4f}; {len(measured)} trials measured, {len(skipped)} skipped."
        )
        return SearchResult(best=best_v, closest=None, statement=statement, baseline=baseline, pareto_front=front)
    misses = [(v, t, planner.violation(spec, t.metrics)) for v, t in measured]
    misses = [m for m in misses if m[2] is not None]
    if not misses:
        return SearchResult(
            best=None,
            closest=None,
            statement=f"No trial was measured against {bound}: every trial failed or was cancelled.",
            baseline=baseline,
            pareto_front=front,
        )
    close_v, close_t, by = min(misses, key=lambda m: (m[2], obj(m[1])))
    statement = (
        f"No trial met {bound}. The closest, {close_v.recipe}, missed it by {by:.4f} "
        f"({metric} {quality(close_v):.4f}; {obj(close_t):,.4g} {unit})."
    )
    return SearchResult(best=None, closest=close_v, statement=statement, baseline=baseline, pareto_front=front)


def _bound_text(spec: SearchSpec) -> str:
    c = spec.constraint
    if c.max_accuracy_drop is not None:
        return f"max_accuracy_drop {c.max_accuracy_drop:g}"
    return f"min_cosine {c.min_cosine:g}"


def get_search(session: Session, *, search_id: str, user: User) -> tuple[CompressionJob, SearchDetails]:
    """The search's job row (the caller renders it as a job) and its spec, trials and result."""
    search = get_owned(session, CompressionJob, search_id, user, "search")
    if search.kind != "search":
        raise NotFound(f"search {search_id!r} not found (it is a compression job)", code="search_not_found")
    spec = SearchSpec.model_validate(search.spec)
    trials = _trial_views(session, search.id)
    skipped = [
        TrialPublic(job_id=None, recipe=s["recipe"], steps=[], status="skipped", reason=s["reason"])
        for s in ((search.report or {}).get("skipped") or [])
    ]
    views: list[TrialPublic] = []
    result = summarize(spec, trials, [], views=views)
    return search, SearchDetails(
        spec=spec,
        trials_done=sum(t.status in planner.TERMINAL for t in trials),
        trials_planned=len(trials),
        trials=views + skipped,
        result=result if search.status in jobs.TERMINAL else None,
    )
