"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine): check that they say what the code
reads, so they cannot drift from the settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_services_and_settings_match_the_code() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "postgres", "redis"} <= set(services)
    fields = set(Settings.model_fields)
    for name in ("api", "worker"):
        env = services[name]["environment"]
        for var in env:
            assert var.startswith("SQUEEZE_"), var
            assert var.removeprefix("SQUEEZE_").lower() in fields, f"{name}: {var} is not a setting"
        # What each process needs to find the others.
        assert env["SQUEEZE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SQUEEZE_BROKER_URL"].startswith("redis://redis:")
        assert services[name]["command"][0] == "squeeze"
        assert any(v.endswith(":/data") for v in services[name]["volumes"])  # shared blob store
    assert services["api"]["command"][1] == "serve" and "--no-worker" in services["api"]["command"]
    assert services["worker"]["command"][1] == "worker"
    for dep in ("postgres", "redis"):
        assert "healthcheck" in services[dep]
        assert services["api"]["depends_on"][dep]["condition"] == "service_healthy"


def test_dockerfile_installs_the_pinned_torch_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = next(line.strip().strip('",') for line in pyproject.splitlines() if '"torch==' in line)
    assert torch_pin in text
    assert "USER squeeze" in text and "HEALTHCHECK" in text
    assert 'CMD ["squeeze", "serve"' in text
