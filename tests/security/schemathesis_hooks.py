"""Schemathesis hooks for ``test_schemathesis.py``, loaded by the ``st`` process it starts (``SCHEMATHESIS_HOOKS``),
never imported by pytest.

- Upload bodies: from ``format: binary`` schemathesis can only make up bytes, which inspection refuses (422), so
  the accepting path would never run. Half of the generated files are swapped for a real model or dataset (paths in
  ``ST_SQUEEZE_MODEL`` / ``ST_SQUEEZE_DATASET``), in multipart bodies (other form fields still generated) and raw
  octet-stream bodies alike: uploads are then stored, and the stateful phase follows the new ids to GET, download
  and DELETE.
- Job specs: half of those with a well-formed ``model_id`` get the id of a model uploaded earlier in the run
  instead, and of a dataset (unless they carry a malformed ``dataset_id``), so that submission gets past "not
  found" to the checks of spec against model and to 202 (three in four, since most generated specs are refused on
  their own). Only valid ids go in, for valid or absent ones: a negative case stays negative. In those, a
  well-formed ``train_dataset_id`` or ``notify_url`` is dropped and ``device: cuda`` becomes ``cpu`` (valid values
  this deployment refuses: no second dataset, webhooks off, no GPU worker), and a well-formed Idempotency-Key is
  made unique (``before_call``).
  The test uploads a model and a dataset before the run for this (fuzzing may reach POST /v1/jobs before any
  upload); schemathesis finds their ids in listings too, so cases that would DELETE those two are dropped.
- A retried upload (same ``Idempotency-Key``) gets the first upload back without its body being read, as
  documented; a schema-violating body sent with a reused key is then "accepted" (ST201). Only that failure, for a
  response that returns an upload created earlier in the run, is dropped; every other check stays on.
- Multipart form fields are text on the wire: a "negative" ``name`` of another type is sent as its JSON text,
  which is a valid name (schemathesis knows this for path and query parameters, not for form fields). ST201 for a
  multipart case whose only mutations change a body property's type is dropped too.
- Every call is appended to ``ST_SQUEEZE_CALLS`` as a JSON line, so the test can check what was exercised.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis.transport.serialization import Binary

REAL_FILES = {
    "/v1/models": Path(os.environ["ST_SQUEEZE_MODEL"]).read_bytes(),
    "/v1/datasets": Path(os.environ["ST_SQUEEZE_DATASET"]).read_bytes(),
}
CALLS = Path(os.environ["ST_SQUEEZE_CALLS"])
_lock = threading.Lock()
_times_returned: Counter[str] = Counter()  # upload id -> how many 201 responses carried it
SEEDED = {
    "/v1/models": os.environ.get("ST_SQUEEZE_MODEL_IDS", "").split(),
    "/v1/datasets": os.environ.get("ST_SQUEEZE_DATASET_IDS", "").split(),
}
_uploaded: dict[str, list[str]] = {path: list(ids) for path, ids in SEEDED.items()}  # uploads so far, by path


def _upload_id(case: schemathesis.Case, response: schemathesis.Response) -> str | None:
    if case.method.upper() != "POST" or case.operation.path not in REAL_FILES or response.status_code != 201:
        return None
    try:
        return str(response.json()["id"])
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Keep the seeded model and dataset: drop cases that would DELETE them."""
    if case.method.upper() != "DELETE":
        return True
    collection = case.operation.path.rsplit("/", 1)[0]
    return not any(v in SEEDED.get(collection, ()) for v in (case.path_parameters or {}).values())


@schemathesis.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    op = context.operation
    if op is not None and op.method.upper() == "POST" and op.path == "/v1/jobs":
        return _with_uploaded_ids(body)
    if op is None or op.method.upper() != "POST" or op.path not in REAL_FILES:
        return st.just(body)
    real = Binary(REAL_FILES[op.path])
    if isinstance(body, dict) and isinstance(body.get("file"), Binary | bytes):
        return st.sampled_from([body, {**body, "file": real}])
    if isinstance(body, Binary | bytes):
        return st.sampled_from([body, real])
    return st.just(body)  # negative mode: not a file at all


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 64


def _with_uploaded_ids(body: Any) -> st.SearchStrategy[Any]:
    with _lock:
        models, datasets = list(_uploaded["/v1/models"]), list(_uploaded["/v1/datasets"])
    if not (isinstance(body, dict) and _valid_id(body.get("model_id")) and models):
        return st.just(body)
    # A dataset too, unless the body carries an invalid dataset_id (its violation must stay): most steps need one.
    swap_dataset = bool(datasets) and (body.get("dataset_id") is None or _valid_id(body.get("dataset_id")))
    # A well-formed train_dataset_id is left out: it is accepted only with a training step and a second dataset
    # (never the evaluation one), so a made-up one would keep almost every case at 404. A malformed one stays.
    rest = {k: v for k, v in body.items() if not (k == "train_dataset_id" and (v is None or _valid_id(v)))}
    # Valid values this deployment refuses anyway (no GPU worker, webhooks off) are swapped for valid ones it takes.
    if rest.get("device") == "cuda":
        rest["device"] = "cpu"
    if isinstance(rest.get("notify_url"), str):
        del rest["notify_url"]
    real = st.builds(
        lambda m, d: {**rest, "model_id": m, **({"dataset_id": d} if swap_dataset else {})},
        st.sampled_from(models),
        st.sampled_from(datasets) if swap_dataset else st.none(),
    )
    # Three in four: the accepting path is the deepest one, and most generated specs are refused on their own.
    return st.one_of(st.just(body), real, real, real)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, **kwargs: Any) -> None:
    """A job spec that got the seeded ids gets a fresh Idempotency-Key in place of a well-formed generated one: the
    generator repeats short keys ("0", "00"), and a reused key is refused (422 idempotency_key_reused) or replayed,
    which kept the accepting path of POST /v1/jobs from running in some runs. Malformed keys stay (negative)."""
    if case.method.upper() != "POST" or case.operation.path != "/v1/jobs" or not isinstance(case.body, dict):
        return
    with _lock:
        seeded = case.body.get("model_id") in _uploaded["/v1/models"]
    for name, value in list((case.headers or {}).items()):
        if seeded and name.lower() == "idempotency-key" and _well_formed_key(value):
            case.headers[name] = uuid.uuid4().hex  # type: ignore[index]


def _well_formed_key(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 200 and all("!" <= ch <= "~" for ch in value)


def _error_code(response: schemathesis.Response) -> str | None:
    if response.status_code < 400:
        return None
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response) -> None:
    line = json.dumps(
        {
            "method": case.method.upper(),
            "path": case.operation.path,
            "media_type": case.media_type,
            "status": response.status_code,
            "code": _error_code(response),
        }
    )
    with _lock:
        if (upload := _upload_id(case, response)) is not None:
            _times_returned[upload] += 1
            if _times_returned[upload] == 1:
                _uploaded[case.operation.path].append(upload)
        with CALLS.open("a") as f:
            f.write(line + "\n")


@schemathesis.hook
def filter_failure(
    context: schemathesis.HookContext, failure: Any, case: schemathesis.Case, response: schemathesis.Response
) -> bool:
    """False drops the failure: only ST201 on an idempotent replay of an earlier upload, or on a multipart body
    whose only violations are types, which multipart cannot carry."""
    if failure.code != "ST201":
        return True
    replayed = (upload := _upload_id(case, response)) is not None and _times_returned[upload] > 1
    keyed = any(k.lower() == "idempotency-key" for k in (case.headers or {}))
    return not ((replayed and keyed) or _only_type_changes_in_form(case))


def _only_type_changes_in_form(case: schemathesis.Case) -> bool:
    mutations = getattr(getattr(case.meta, "phase", None), "data", None)
    mutations = getattr(mutations, "mutations", None)
    return (
        case.media_type == "multipart/form-data"
        and bool(mutations)
        and all(m.operator == "change_type" and m.parameter_location == "body" for m in mutations)
    )
