"""Schemathesis against a real ``squeeze serve``: every operation of ``/openapi.json``, every check, every phase
(examples, coverage, fuzzing, stateful), with a valid key.

The server runs on this session's PostgreSQL and Redis, as in production. The ``st`` command line drives it and
must exit 0: no 5xx, every response (status, content type, headers, body) as the schema declares, schema-valid
requests accepted, schema-violating ones refused, missing keys refused, 405 with a true ``Allow``.

Uploads are parsed by hand (``UPLOAD_BODY`` in ``app/models/router.py``), so the hooks in
``schemathesis_hooks.py`` swap half the generated files for a real model or dataset: both media types
(multipart and octet-stream) are then stored, listed, downloaded and deleted, not only refused. The test
checks from the hooks' log of calls that this happened.

Bounded: ``SQUEEZE_SCHEMATHESIS_EXAMPLES`` examples per operation and phase (default 40, ~30-45 s here);
``SQUEEZE_SCHEMATHESIS_SEED`` replays a run (the seed is printed at the end of every run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_user
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.service import Processes, free_port, wait_healthy

ST = Path(sys.executable).parent / "st"
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
MAX_EXAMPLES = int(os.environ.get("SQUEEZE_SCHEMATHESIS_EXAMPLES", "40"))
RUN_TIMEOUT_S = 240
UPLOADS = ("/v1/models", "/v1/datasets")

# schemathesis.toml. Every check stays on. What is relaxed: here, which statuses positive_data_acceptance (ST202)
# accepts for a schema-valid request where validity depends on something a schema cannot express; in
# schemathesis_hooks.py, two kinds of ST201 that are not the API's (an idempotent replay, types in form fields).
CONFIG = """
# A job's event stream (GET /v1/jobs/{id}/events) lasts until the job ends, and no worker runs here: read the
# first event, then stop.
max-stream-events = 1
request-timeout = 30

# `cursor` is opaque: only a value a listing returned decodes; any other string is answered 400 invalid_cursor.
[[operations]]
include-name = ["GET /v1/models", "GET /v1/datasets", "GET /v1/jobs"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

# Uploads are inspected: "format: binary" cannot say "an ONNX model" or "an .npz of arrays", so made-up bytes
# are answered 422 invalid_model / invalid_dataset. Whether a spec fits its model (format, inputs, dataset) is
# checked against the uploaded files: 422 invalid_spec-style codes, also for a reused Idempotency-Key. A search
# is checked the same way (labels for an accuracy budget, methods the format offers, allowed notify_url).
[[operations]]
include-name = ["POST /v1/models", "POST /v1/datasets", "POST /v1/jobs", "POST /v1/searches"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

# A job spec is the API's largest input: more examples, so that enough of them reach the checks behind "not found"
# (the hooks give some the seeded ids) and the accepting path runs in every run, not in most.
[[operations]]
include-name = ["POST /v1/jobs"]
generation.max-examples = 150
"""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(RUN_TIMEOUT_S + 120)]


def test_api_conforms_to_its_openapi_schema(service_env: dict[str, str], clean_db: None, tmp_path: Path) -> None:
    model_file, dataset_file = tmp_path / "digits.onnx", tmp_path / "digits.npz"
    model_file.write_bytes(digits_onnx_bytes())
    dataset_file.write_bytes(digits_npz_bytes())
    config, calls_log = tmp_path / "schemathesis.toml", tmp_path / "calls.jsonl"
    config.write_text(CONFIG)
    key = make_user(f"schemathesis-{uuid.uuid4().hex[:6]}")
    base_url = f"http://127.0.0.1:{free_port()}"

    procs = Processes(tmp_path, service_env)
    try:
        procs.start("api", "serve", "--port", base_url.rsplit(":", 1)[1], "--no-worker")
        wait_healthy(base_url)
        # One model and one dataset up front, for the hooks to put in job specs (see schemathesis_hooks.py).
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            seeded = {
                path: client.post(path, files={"file": file.read_bytes()}).raise_for_status().json()["id"]
                for path, file in zip(UPLOADS, (model_file, dataset_file), strict=True)
            }
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": str(HOOKS),
            "ST_SQUEEZE_MODEL": str(model_file),
            "ST_SQUEEZE_DATASET": str(dataset_file),
            "ST_SQUEEZE_MODEL_IDS": seeded["/v1/models"],
            "ST_SQUEEZE_DATASET_IDS": seeded["/v1/datasets"],
            "ST_SQUEEZE_CALLS": str(calls_log),
        }
        seed = os.environ.get("SQUEEZE_SCHEMATHESIS_SEED")
        cmd = [
            str(ST),
            f"--config-file={config}",
            "run",
            f"{base_url}/openapi.json",
            "--checks=all",
            f"--max-examples={MAX_EXAMPLES}",
            "--workers=1",
            # The hooks drop DELETEs aimed at the seeded model and dataset; when the stateful phase keeps linking
            # to them, Hypothesis reports "too many examples filtered". That is about generation, not the server.
            "--suppress-health-check=filter_too_much",
            "--no-color",
            "--header",
            f"Authorization: Bearer {key}",
            *([f"--seed={seed}"] if seed else []),
        ]
        # In the temporary folder: schemathesis keeps its example database and reports in the working directory.
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    finally:
        procs.stop_all()

    output = run.stdout + run.stderr
    api_log = procs.log("api")
    assert run.returncode == 0, failure_report(output, api_log)

    calls = [json.loads(line) for line in calls_log.read_text().splitlines()]
    seen = Counter((c["method"], c["path"], c["media_type"], c["status"]) for c in calls)
    server_errors = [c for c in calls if c["status"] >= 500]
    assert not server_errors, server_errors[:10]
    assert "Traceback" not in api_log, api_log[-4000:]
    # Every phase ran; the stateful one followed links between real resources.
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅\s+{phase}\b", output), f"phase {phase} did not pass:\n{output[-5000:]}"
    # The hand-parsed upload bodies were stored through both media types, and refused when not a model/dataset.
    for path in UPLOADS:
        for media_type in ("multipart/form-data", "application/octet-stream"):
            assert seen["POST", path, media_type, 201], f"no {media_type} upload stored on {path}"
        assert any(c["path"] == path and c["method"] == "POST" and c["status"] == 422 for c in calls), path
        assert any(c["path"] == f"{path}/{{{path[4:-1]}_id}}/download" and c["status"] == 200 for c in calls), path
    jobs = Counter((c["status"], c["code"]) for c in calls if c["path"] == "/v1/jobs" and c["method"] == "POST")
    assert jobs[202, None], f"no job accepted; POST /v1/jobs answers (status, code): {jobs.most_common()}"


def failure_report(output: str, api_log: str) -> str:
    """Schemathesis's failures (from its first failure heading) and summary, and the API's tracebacks."""
    start = output.find("_" * 10)
    failures = output[start if start >= 0 else 0 :]
    if len(failures) > 16000:
        failures = failures[:12000] + "\n[...]\n" + failures[-4000:]
    tracebacks = [line for line in api_log.splitlines() if "Traceback" in line][-3:]
    api = "\n".join(t[-3000:] for t in tracebacks)
    return f"schemathesis failed:\n{failures}\n--- API tracebacks (last 3) ---\n{api}"
