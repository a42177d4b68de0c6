"""The dashboard as a person uses it: headless Chromium (Debian's ``chromium``, driven by Playwright) against a
real API, Celery worker, Redis and PostgreSQL. Sign in with a key, upload a model and data through the page,
submit a job, watch it progress in the list, read the before/after table, compare two recipes on the plot.

Screenshots are kept in ``tests/artifacts/`` (``dashboard.png``: the trade-off view; ``dashboard-job.png``: a
job). Without ``/usr/bin/chromium`` the test fails under CI (``CI`` set) and is skipped elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright

from tests.e2e.conftest import Deployment
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.service import ROOT, wait_for, wait_job

CHROMIUM = Path(os.environ.get("SQUEEZE_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "tests" / "artifacts"
METRICS = (
    "size_bytes",
    "parameters",
    "nonzero_parameters",
    "sparsity",
    "accuracy",
    "agreement",
    "cosine",
    "max_abs_error",
    "latency_ms.p50",
    "latency_ms.p95",
)
# A model name a user typed: shown as text, never parsed as markup.
HOSTILE_NAME = 'digits <img src=x onerror="document.title=1"><script>document.title=2</script>'

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install -y chromium); the dashboard test needs a real browser"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as p:
        # Debian's build, never a browser that Playwright downloads.
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


def _pick(obj: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _row_state(page: Page, job_id: str) -> tuple[str, str] | None:
    row = page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')
    if not row.count():
        return None
    return row.locator(".status").get_attribute("data-status") or "", row.locator(".pct").inner_text()


def _submit(page: Page, model_id: str, preset: str) -> None:
    page.click('#nav a[data-view="new"]')
    expect(page.locator(f'#job-model option[value="{model_id}"]')).to_have_count(1)
    page.select_option("#job-model", model_id)
    page.select_option("#job-preset", label=preset)
    page.click("#submit-job button[type=submit]")
    page.wait_for_url("**/dashboard#/jobs")


def test_dashboard_drives_the_api_end_to_end(
    deployment: Deployment, page: Page, tmp_path: Path, record_property: Any
) -> None:
    key = deployment.new_key(f"dash-{uuid.uuid4().hex[:6]}")
    client = deployment.client(key)
    model_file, data_file = tmp_path / "digits.onnx", tmp_path / "digits.npz"
    model_file.write_bytes(digits_onnx_bytes())
    data_file.write_bytes(digits_npz_bytes())

    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(msg: ConsoleMessage) -> None:
        # A refused key is a 401 that Chromium logs as a failed resource; anything else (a CSP refusal, a script
        # error) is a defect.
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            problems.append(msg.text)

    page.on("console", on_console)
    api_requests: list[Request] = []
    page.on("request", lambda r: api_requests.append(r) if "/v1/" in r.url else None)

    # The root redirects to the page, which is served with a strict CSP and asks for a key.
    response = page.goto(f"{deployment.base_url}/")
    assert response is not None and response.url.endswith("/dashboard")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    expect(page.locator("#login")).to_be_visible()

    page.fill("#login-key", "sqz_not_a_key")
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_contain_text("invalid_api_key")
    page.fill("#login-key", key)
    page.click("#login-form button")
    expect(page.locator("#nav")).to_be_visible()
    expect(page.locator("#jobs-table")).to_contain_text("No jobs yet")

    # Upload through the page.
    page.click('#nav a[data-view="new"]')
    page.set_input_files("#upload-model-file", str(model_file))
    page.fill("#upload-model-name", HOSTILE_NAME)
    page.click("#upload-model button")
    expect(page.locator("#upload-model-result")).to_contain_text("Uploaded")
    page.set_input_files("#upload-dataset-file", str(data_file))
    page.click("#upload-dataset button")
    expect(page.locator("#upload-dataset-result")).to_contain_text("Uploaded")
    model_id = page.locator("#upload-model-result").get_attribute("data-id")
    dataset_id = page.locator("#upload-dataset-result").get_attribute("data-id")
    assert client.get(f"/v1/models/{model_id}").json()["name"] == HOSTILE_NAME
    assert client.get(f"/v1/datasets/{dataset_id}").json()["num_samples"] == 397
    expect(page.locator("#job-dataset")).to_have_value(dataset_id or "")

    # Submit prune 50% + int8 (the default recipe) and watch it move in the list.
    expect(page.locator("#job-preset")).to_have_value("Prune 50% + int8 dynamic")
    page.click("#submit-job button[type=submit]")
    page.wait_for_url("**/dashboard#/jobs")
    first = client.get("/v1/jobs").json()["items"][0]
    assert first["spec"]["model_id"] == model_id and first["spec"]["dataset_id"] == dataset_id
    assert [s["method"] for s in first["spec"]["steps"]] == ["magnitude", "int8_dynamic"]
    seen: list[tuple[str, str]] = []

    def finished() -> bool:
        state = _row_state(page, first["id"])
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        return bool(state) and state[0] in ("succeeded", "failed", "cancelled")

    wait_for(finished, timeout=180, interval=0.05, what="the job to finish in the list")
    assert seen[-1] == ("succeeded", "100%"), seen
    assert any(status in ("queued", "running") for status, _ in seen), f"never saw the job before it ended: {seen}"
    assert len(seen) >= 2, seen

    # The detail: the before/after table shows the API's numbers.
    job = client.get(f"/v1/jobs/{first['id']}").json()
    page.click(f'#jobs-table tr[data-job-id="{first["id"]}"] a[href^="#/jobs/"]')
    expect(page.locator("#metrics-table")).to_be_visible()
    compared = 0
    for side in ("baseline", "result"):
        for metric in METRICS:
            expected = _pick(job["metrics"][side], metric)
            cell = page.locator(f'#metrics-table td[data-side="{side}"][data-metric="{metric}"]')
            shown = cell.get_attribute("data-value")
            if expected is None:
                assert shown == "", (side, metric, shown)
                continue
            assert float(shown or "nan") == expected, (side, metric, shown, expected)
            compared += 1
        accuracy = job["metrics"][side]["accuracy"]
        cell = page.locator(f'#metrics-table td[data-side="{side}"][data-metric="accuracy"]')
        assert cell.inner_text() == f"{accuracy:.4f}"
    assert compared >= 16
    layers = job["metrics"].get("layers") or (job["metrics"]["result"] or {}).get("layers")
    if layers:
        expect(page.locator("svg.layers g.layer")).to_have_count(len(layers))
        if any(row.get("sensitivity") is not None for row in job["metrics"]["baseline"].get("layers") or []):
            expect(page.locator("svg.layers")).to_contain_text("sensitivity")
    else:
        expect(page.locator("#layers-empty")).to_have_text("no per-layer data")
    expect(page.locator("#steps > li")).to_have_count(2)
    expect(page.locator("#job-log")).to_contain_text("state: succeeded")
    expect(page.locator("#artifacts-table tbody tr")).to_have_count(len(job["artifacts"]))
    expect(page.locator("#job-model-link")).to_have_text(HOSTILE_NAME)
    # A download goes through fetch (the key in a header), and yields the artifact's exact bytes.
    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    with page.expect_download() as download:
        page.click(f'button.download[data-artifact-id="{art["id"]}"]')
    saved = tmp_path / "downloaded.onnx"
    download.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == art["sha256"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "dashboard-job.png", full_page=True)

    # A second recipe, then the trade-off plot of the model's jobs shows both.
    _submit(page, model_id or "", "int8 dynamic")
    second = client.get("/v1/jobs").json()["items"][0]
    assert second["id"] != first["id"]
    assert wait_job(client, second["id"], timeout=180)["status"] == "succeeded"
    page.click('#nav a[data-view="models"]')
    page.click(f'#models-table tr[data-model-id="{model_id}"] a')
    points = page.locator("#tradeoff svg circle.point")
    expect(points).to_have_count(2)
    assert {points.nth(i).get_attribute("data-job-id") for i in range(2)} == {first["id"], second["id"]}
    expect(page.locator("#tradeoff svg rect.baseline-point")).to_have_count(1)
    legend = page.locator("#tradeoff-legend")
    expect(legend.locator(f'li[data-job-id="{first["id"]}"]')).to_contain_text(
        "prune magnitude 50% scope=global → quantize int8_dynamic"
    )
    expect(legend.locator(f'li[data-job-id="{second["id"]}"]')).to_contain_text("quantize int8_dynamic")
    expect(page.locator("#plot-y")).to_have_value("accuracy")
    # Cosine instead of accuracy: still one point per job.
    page.select_option("#plot-y", "cosine")
    expect(points).to_have_count(2)
    page.select_option("#plot-y", "accuracy")

    # The hostile name stayed text everywhere; no markup from it ran.
    assert page.locator("main img").count() == 0 and page.title() == "Squeeze"
    expect(page.locator("h2 .name")).to_have_text(HOSTILE_NAME)
    # The key travelled only as a header.
    assert api_requests and all(key not in r.url for r in api_requests)
    assert all(r.headers.get("authorization", "").startswith("Bearer ") for r in api_requests)
    assert not problems, problems

    shot = ARTIFACTS / "dashboard.png"
    page.screenshot(path=shot, full_page=True)
    record_property("screenshot", str(shot))
    print(f"dashboard screenshots: {shot} {ARTIFACTS / 'dashboard-job.png'}")
