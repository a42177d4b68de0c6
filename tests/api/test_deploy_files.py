"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine): check that the compose file is valid
Compose, and that both say what the code reads, so they cannot drift from the settings."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SQUEEZE_SERVICES = ("api", "worker-cpu", "worker-gpu")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _resolved(value: object) -> str:
    """A compose value as a container sees it when no variable is set: ``${X:-default}`` → default, ``$$`` → ``$``."""
    return _INTERPOLATION.sub(lambda m: m.group(2), str(value)).replace("$$", "$")


def test_compose_file_follows_the_compose_specification() -> None:
    # The Compose Specification's JSON schema (compose-spec/compose-spec, Apache-2.0), as vendored by check-jsonschema.
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)

    # The schema is not a rubber stamp: it refuses what Compose would refuse.
    validator = validator_class(schema)
    broken = _compose()
    broken["services"]["api"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert not validator.is_valid(broken)
    broken = _compose()
    broken["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    assert not validator.is_valid(broken)


def test_every_squeeze_variable_is_a_setting_with_a_valid_value() -> None:
    services = _compose()["services"]
    fields = set(Settings.model_fields)
    for name in SQUEEZE_SERVICES:
        env = services[name]["environment"]
        assert env, name
        values = {}
        for var, value in env.items():
            assert var.startswith("SQUEEZE_"), f"{name}: {var}"
            field = var.removeprefix("SQUEEZE_").lower()
            assert field in fields, f"{name}: {var} is not a setting"
            values[field] = _resolved(value)
        settings = Settings(**values)  # types and constraints hold for the values as written
        # Blobs in the MinIO bucket: API and workers share no disk.
        assert settings.storage_backend == "s3" and settings.s3_bucket
        assert settings.s3_endpoint_url == "http://minio:9000"
        assert settings.s3_access_key_id.get_secret_value() and settings.s3_secret_access_key.get_secret_value()
        # What each process needs to find the others.
        assert settings.database_url.startswith("postgresql+psycopg://") and "@postgres:5432/" in settings.database_url
        assert settings.broker_url.startswith("redis://redis:6379/")


def test_services_commands_healthchecks_and_dependencies() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"api", "worker-cpu", "worker-gpu", "postgres", "redis", "minio", "minio-init"} <= set(services)

    api, cpu, gpu = (services[n] for n in SQUEEZE_SERVICES)
    assert "--hostname=squeeze-{'-'.join(wanted)}-{os.getpid()}@%h" in (ROOT / "app" / "cli.py").read_text()
    assert api["command"][:2] == ["squeeze", "serve"] and "--no-worker" in api["command"]
    for worker, queue in ((cpu, "cpu"), (gpu, "gpu")):
        command = worker["command"]
        assert command[:2] == ["squeeze", "worker"] and command[command.index("--queues") + 1] == queue
        # The worker names itself squeeze-<queues>-<pid>@host (app/cli.py); the healthcheck pings that name.
        assert f"--destination squeeze-{queue}-1@$$HOSTNAME" in worker["healthcheck"]["test"][1]

    # The GPU worker: its own queue, a CUDA build of torch, and one NVIDIA GPU reserved.
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cu128" and api["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert gpu["image"] != api["image"] == cpu["image"]

    # Everything long-running has a healthcheck; what depends on it waits for it.
    for name, service in services.items():
        if name != "minio-init":
            assert "healthcheck" in service, name
    for name in SQUEEZE_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    assert cpu["depends_on"]["api"]["condition"] == "service_healthy"  # the API migrates the schema first
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"

    # minio-init creates the bucket the settings name, with the credentials the settings carry.
    env = api["environment"]
    assert f"local/{env['SQUEEZE_S3_BUCKET']}" in services["minio-init"]["command"][0]
    for minio in (services["minio"], services["minio-init"]):
        assert minio["environment"]["MINIO_ROOT_USER"] == env["SQUEEZE_S3_ACCESS_KEY_ID"]
        assert minio["environment"]["MINIO_ROOT_PASSWORD"] == env["SQUEEZE_S3_SECRET_ACCESS_KEY"]

    # Named volumes: declared, and none shared between the API and a worker.
    def volumes(service: dict[str, Any]) -> set[str]:
        return {v.split(":")[0] for v in service.get("volumes", [])}

    for service in services.values():
        assert volumes(service) <= set(compose["volumes"])
    assert not volumes(api) & (volumes(cpu) | volumes(gpu))
    assert all(volumes(s) for s in (api, cpu, gpu, services["postgres"], services["minio"]))


def test_dockerfile_builds_cpu_and_cuda_variants_of_the_pinned_torch_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert f'"{torch_pin}"' in text
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage: build tools stay out of the image
    assert "ARG TORCH_VARIANT=cpu" in text and "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert "USER squeeze" in text and "HEALTHCHECK" in text
    assert 'CMD ["squeeze", "serve"' in text
    # Every package the project installs is copied into the build (else `squeeze` fails on import).
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert re.search(rf"^COPY {package} ", text, re.M), package
    assert re.search(r"^COPY migrations ", text, re.M)
