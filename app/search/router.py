from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, status

from app.deps import CurrentUser, SessionDep, SettingsDep
from app.jobs.views import to_public
from app.queue import enqueue_job
from app.responses import errors
from app.search import service
from app.search.schemas import SearchDetails, SearchPublic, SearchSpec
from app.tables import CompressionJob

router = APIRouter(prefix="/v1/searches", tags=["searches"])

EXAMPLE = {
    "model_id": "mdl_...",
    "dataset_id": "dst_...",
    "constraint": {"max_accuracy_drop": 0.01},
    "objective": "size",
    "max_trials": 24,
    "time_budget_s": 1800,
}


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=errors(400, 404, 409, 422, 429))
def submit_search(
    spec: Annotated[SearchSpec, Body(examples=[EXAMPLE])],
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
) -> SearchPublic:
    """Search for the best compressed model that meets an accuracy or fidelity budget.

    Trials are ordinary jobs (cached, owned, cancellable), spread over every worker. The search is itself a job:
    follow it with `GET /v1/jobs/{id}` and its `/events`, cancel it with `POST /v1/jobs/{id}/cancel` (its trials
    stop too). When it ends, `result` holds the best trial that meets the constraint (its model and report are
    the search job's artifacts), or the closest miss and by how much it missed, the Pareto front and every trial.
    """
    search = service.create_search(session, settings, spec=spec, user=user)
    enqueue_job(search.id, search.queue)  # after the commit, with the id only
    return _public(*service.get_search(session, search_id=search.id, user=user))


@router.get("/{search_id}", responses=errors(404))
def get_search(search_id: str, session: SessionDep, user: CurrentUser) -> SearchPublic:
    """A search: its job (status, progress, stage), every trial with its numbers, and the result once finished."""
    return _public(*service.get_search(session, search_id=search_id, user=user))


def _public(search: CompressionJob, details: SearchDetails) -> SearchPublic:
    return SearchPublic(job=to_public(search), **dict(details))
