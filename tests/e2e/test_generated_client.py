"""A client generated from the live ``/openapi.json`` by a real generator works against a real server.

OpenAPI Generator (``openapi-generator-cli`` from PyPI: the jar ships in the wheel and runs on the machine's Java)
writes a Python client into a temporary folder, offline. The test imports it and, through its typed methods only,
lists models, uploads a model and a dataset (multipart), submits a job, follows it to the end and reads it back,
with errors arriving as the documented envelope. (openapi-python-client would be the pure-Python choice, but its
last release requires typer<0.28, which conflicts with the typer this project pins.)
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Deployment
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.service import wait_for

GENERATOR = Path(sys.executable).with_name("openapi-generator-cli")
PACKAGE = "squeeze_generated"

pytestmark = pytest.mark.timeout(240)


def _generate(base_url: str, out: Path) -> None:
    if shutil.which("java") is None:
        reason = "OpenAPI Generator needs a Java runtime (apt-get install -y default-jre-headless)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    spec = out / "openapi.json"
    spec.write_bytes(httpx.get(f"{base_url}/openapi.json", timeout=30).raise_for_status().content)
    run = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--generator-name=python",
            f"--input-spec={spec}",
            f"--output={out / 'client'}",
            f"--package-name={PACKAGE}",
            "--global-property=apiTests=false,modelTests=false,apiDocs=false,modelDocs=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "ERROR" not in run.stdout, run.stdout[-4000:]


@pytest.fixture
def generated(deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    _generate(deployment.base_url, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "client"))
    module: ModuleType = importlib.import_module(PACKAGE)
    yield module
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def test_generated_client_uploads_submits_and_reads_back(deployment: Deployment, generated: Any) -> None:
    sq = generated
    key = deployment.new_key(f"gen-{uuid.uuid4().hex[:6]}")
    config = sq.Configuration(host=deployment.base_url, access_token=key)
    with sq.ApiClient(config) as api_client:
        models, datasets, jobs = sq.ModelsApi(api_client), sq.DatasetsApi(api_client), sq.JobsApi(api_client)

        listed = models.list_models()
        assert isinstance(listed, sq.ModelsPublic) and listed.items == []

        model = models.upload_model(file=("digits.onnx", digits_onnx_bytes()), name="digits from a generated client")
        assert isinstance(model, sq.ModelPublic)
        assert model.format == "onnx" and model.name == "digits from a generated client"
        assert model.inputs[0].name == "input" and model.parameters > 30_000
        dataset = datasets.upload_dataset(file=("digits.npz", digits_npz_bytes()))
        assert isinstance(dataset, sq.DatasetPublic) and dataset.num_samples == 397 and dataset.has_labels

        spec = sq.JobSpec(
            model_id=model.id,
            dataset_id=dataset.id,
            steps=[
                sq.StepsInner(sq.PruneMagnitude(op="prune", method="magnitude", sparsity=0.5)),
                sq.StepsInner(sq.QuantizeInt8Dynamic(op="quantize", method="int8_dynamic")),
            ],
            evaluation=sq.EvalOptions(latency_runs=3, warmup_runs=1, layer_sensitivity="off"),
        )
        submitted = jobs.submit_job(spec)
        assert isinstance(submitted, sq.JobPublic) and submitted.status in ("queued", "running")

        def finished() -> Any:
            job = jobs.get_job(submitted.id)
            return job if job.status in ("succeeded", "failed", "cancelled") else None

        job = wait_for(finished, timeout=180, interval=0.5, what="the job to finish")
        assert isinstance(job, sq.JobPublic) and job.status == "succeeded", job.error
        assert job.id == submitted.id and job.spec["model_id"] == model.id
        assert job.metrics["result"]["sparsity"] > 0.4
        assert job.metrics["result"]["size_bytes"] < job.metrics["baseline"]["size_bytes"]
        artifact = next(a for a in job.artifacts if a.kind == "model")
        assert isinstance(artifact, sq.ArtifactPublic) and len(artifact.sha256) == 64
        assert sq.ArtifactsApi(api_client).get_artifact(artifact.id).sha256 == artifact.sha256

        assert [m.id for m in models.list_models().items] == [model.id]
        assert submitted.id in [j.id for j in jobs.list_jobs(status="succeeded").items]

        # Errors: the documented envelope, parsed into the generated ErrorResponse.
        with pytest.raises(sq.exceptions.NotFoundException) as missing:
            jobs.get_job("job_does_not_exist")
        assert isinstance(missing.value.data, sq.ErrorResponse)
        assert missing.value.data.error.code == "job_not_found"

    # Without the key: 401 with its code.
    with sq.ApiClient(sq.Configuration(host=deployment.base_url)) as anonymous:
        with pytest.raises(sq.exceptions.UnauthorizedException) as refused:
            sq.ModelsApi(anonymous).list_models()
        assert refused.value.data.error.code == "missing_api_key"
