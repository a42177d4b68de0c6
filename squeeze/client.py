"""The Python client of the Squeeze API: synchronous, on httpx, typed with the service's own response schemas.

    from squeeze.client import Squeeze

    sq = Squeeze()  # SQUEEZE_URL / SQUEEZE_API_KEY, else the file `squeeze login` wrote
    model = sq.upload_model("model.onnx", progress=lambda sent, total: ...)
    data = sq.upload_dataset("data.npz")
    steps = [{"op": "quantize", "method": "int8_dynamic"}]
    job = sq.submit_job({"model_id": model.id, "dataset_id": data.id, "steps": steps})
    job.wait(timeout=600).raise_for_status()
    job.table()  # baseline vs result; renders as HTML in a notebook
    job.download("model.int8.onnx")  # resumable, sha256-verified

Uploads stream from disk; downloads resume from ``<dest>.part`` with ``Range`` and are verified against the
artifact's sha256 (its ``ETag``) before they get their final name. Errors: ``squeeze.errors``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import PrivateAttr

from app.datasets.schemas import DatasetPublic, DatasetsPublic
from app.jobs.schemas import ArtifactPublic, JobPublic, JobsPublic, JobStatus
from app.jobs.spec import JobSpec
from app.models.schemas import ModelPublic, ModelsPublic
from squeeze.config import resolve
from squeeze.errors import (
    ChecksumMismatch,
    ConfigError,
    InvalidArgument,
    JobFailed,
    JobTimeout,
    SqueezeAPIError,
    SqueezeConnectionError,
)
from squeeze.results import ResultTable

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes done, total bytes) as a transfer goes on."""

TERMINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
CHUNK_BYTES = 1024 * 1024
_TRANSIENT_STATUS = (502, 503, 504)
_MAX_TRANSIENT_FAILURES = 5


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("squeeze")
    except PackageNotFoundError:
        return "0"


def _seg(value: str) -> str:
    """An id as one URL path segment: whatever it holds, it cannot reach another route."""
    if not value:
        raise InvalidArgument("an empty id")
    return quote(value, safe="")


def api_error(response: httpx.Response) -> SqueezeAPIError:
    """The ``SqueezeAPIError`` for an error response, from its envelope (or its text, from a proxy)."""
    try:
        body = response.json()
        err = body["error"]
        return SqueezeAPIError(response.status_code, str(err["code"]), str(err["message"]), err.get("details") or {})
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:300] or response.reason_phrase
        return SqueezeAPIError(response.status_code, f"http_{response.status_code}", text)


class Job(JobPublic):
    """A job as the API shows it (``JobPublic``), bound to the client that fetched it.

    ``wait()`` and ``refresh()`` update this object in place (and return it).
    """

    _client: Squeeze | None = PrivateAttr(default=None)

    @classmethod
    def bind(cls, data: dict[str, Any], client: Squeeze) -> Job:
        job = cls.model_validate(data)
        job._client = client
        return job

    @property
    def client(self) -> Squeeze:
        if self._client is None:
            raise RuntimeError("this Job is not bound to a client; get it with Squeeze.get_job")
        return self._client

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def refresh(self) -> Job:
        """Fetch the job's current state into this object."""
        fresh = self.client.get_job(self.id)
        for name in type(self).model_fields:
            setattr(self, name, getattr(fresh, name))
        return self

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 1.0,
        on_update: Callable[[Job], None] | None = None,
        events: bool = True,
    ) -> Job:
        """Wait until the job succeeds, fails or is cancelled, and return it (check ``status``, or call
        ``raise_for_status()``). Raises ``JobTimeout`` after ``timeout`` seconds (the job keeps running).

        Follows the job's Server-Sent Events (resuming with Last-Event-ID after a dropped connection) and falls
        back to polling every ``poll`` seconds if the stream is unavailable.

        ``on_update`` is called after every poll. A few consecutive network errors or 502/503/504 answers are
        ridden out (a server restarting); more raise.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if events and not self.done and self._follow_events(deadline, on_update):
            self.refresh()
            if on_update is not None:
                on_update(self)
            return self
        failures = 0
        while True:
            try:
                self.refresh()
                failures = 0
            except (SqueezeConnectionError, SqueezeAPIError) as exc:
                transient = not isinstance(exc, SqueezeAPIError) or exc.status in _TRANSIENT_STATUS
                failures += 1
                if not transient or failures >= _MAX_TRANSIENT_FAILURES:
                    raise
            else:
                if on_update is not None:
                    on_update(self)
                if self.done:
                    return self
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise JobTimeout(self, timeout or 0.0)
                time.sleep(min(poll, left))
            else:
                time.sleep(poll)

    def _follow_events(self, deadline: float | None, on_update: Callable[[Job], None] | None) -> bool:
        """Apply the job's events until its final state; False if the stream could not be followed to the end."""
        last_id: str | None = None
        for _ in range(_MAX_TRANSIENT_FAILURES):
            try:
                for event in self.client.events(self.id, last_event_id=last_id, deadline=deadline):
                    last_id = event["id"]
                    data = event["data"]
                    if event["event"] == "progress":
                        self.progress, self.stage = data["progress"], data["stage"]
                    elif event["event"] == "state":
                        self.status = data["status"]
                    if on_update is not None:
                        on_update(self)
                    if self.done:
                        return True
            except SqueezeConnectionError:
                continue  # dropped: resume after the last event seen
            except SqueezeAPIError:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(self, 0.0)
        return False

    def cancel(self) -> Job:
        """Cancel the job if it is queued or running; returns its new state."""
        fresh = self.client.cancel_job(self.id)
        for name in type(self).model_fields:
            setattr(self, name, getattr(fresh, name))
        return self

    def raise_for_status(self) -> Job:
        """Raise ``JobFailed`` unless the job succeeded; return it otherwise."""
        if self.status != "succeeded":
            raise JobFailed(self)
        return self

    def artifact(self, kind: str = "model") -> ArtifactPublic | None:
        """The job's artifact of this kind (``model``, ``report`` (JSON) or ``report_markdown``), if it has one."""
        return next((a for a in self.artifacts if a.kind == kind), None)

    def download(self, dest: str | Path, progress: ProgressCallback | None = None, *, kind: str = "model") -> Path:
        """Download the job's compressed model (or its ``report``) to ``dest`` (a file, or a folder)."""
        art = self.artifact(kind)
        if art is None:
            raise InvalidArgument(f"job {self.id} ({self.status}) has no {kind} artifact")
        return self.client.download_artifact(art, dest, progress)

    def table(self) -> ResultTable:
        """Baseline vs result (size, parameters, sparsity, accuracy, agreement, cosine, latency) with ratios."""
        cache = " (cache hit)" if self.cache_hit else ""
        return ResultTable(self.id, self.status, self.metrics, title=f"{self.id}: {self.status}{cache}")


def _parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    current: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in current:
                yield {
                    "id": current.get("id"),
                    "event": current.get("event", "message"),
                    "data": json.loads(current["data"]),
                }
            current = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            current[field] = value[1:] if value.startswith(" ") else value


class Squeeze:
    """A connection to one Squeeze server with one API key.

    ``url`` and ``key`` default to ``SQUEEZE_URL`` / ``SQUEEZE_API_KEY``, then the config file written by
    ``squeeze login``; the URL then to ``http://127.0.0.1:8000``. ``timeout`` applies to each network operation
    (connect, and each read or write), not to a whole transfer. ``transport`` is handed to httpx (proxies, tests).
    """

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        config = resolve(url, key)
        if not config.api_key:
            raise ConfigError("no API key: pass key=..., set SQUEEZE_API_KEY, or run `squeeze login`")
        self.url = config.url
        self._http = httpx.Client(
            base_url=config.url,
            headers={"Authorization": f"Bearer {config.api_key}", "User-Agent": f"squeeze-client/{_version()}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Squeeze:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Squeeze({self.url!r})"

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise SqueezeConnectionError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise api_error(response)
        return response

    def _upload(self, endpoint: str, path: str | Path, name: str | None, progress: ProgressCallback | None) -> Any:
        path = Path(path)
        total = path.stat().st_size

        def body() -> Iterator[bytes]:
            sent = 0
            if progress is not None:
                progress(0, total)
            with path.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, total)

        response = self._request(
            "POST",
            endpoint,
            params={"name": name or path.name},
            content=body(),
            # A known length: the server refuses oversize uploads at once, and no chunked encoding is needed.
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(total)},
        )
        return response.json()

    # -- models -----------------------------------------------------------------------------------------------

    def upload_model(
        self, path: str | Path, name: str | None = None, progress: ProgressCallback | None = None
    ) -> ModelPublic:
        """Upload an ONNX model, a .zip of ONNX with external data, a ``.pt2``, a TorchScript archive, or a Hugging Face
        model folder as a .zip or plain .tar; streamed from disk."""
        return ModelPublic.model_validate(self._upload("/v1/models", path, name, progress))

    def list_models(self, *, limit: int = 50, cursor: str | None = None) -> ModelsPublic:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return ModelsPublic.model_validate(self._request("GET", "/v1/models", params=params).json())

    def get_model(self, model_id: str) -> ModelPublic:
        return ModelPublic.model_validate(self._request("GET", f"/v1/models/{_seg(model_id)}").json())

    def delete_model(self, model_id: str) -> None:
        """Delete a model (409 while a queued or running job uses it)."""
        self._request("DELETE", f"/v1/models/{_seg(model_id)}")

    # -- datasets ---------------------------------------------------------------------------------------------

    def upload_dataset(
        self, path: str | Path, name: str | None = None, progress: ProgressCallback | None = None
    ) -> DatasetPublic:
        """Upload an ``.npz`` (one array per model input, optional integer ``labels``) or, for hf models, a JSONL file
        of ``{"text": ..., "label": ...}`` lines; streamed from disk."""
        return DatasetPublic.model_validate(self._upload("/v1/datasets", path, name, progress))

    def list_datasets(self, *, limit: int = 50, cursor: str | None = None) -> DatasetsPublic:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return DatasetsPublic.model_validate(self._request("GET", "/v1/datasets", params=params).json())

    def get_dataset(self, dataset_id: str) -> DatasetPublic:
        return DatasetPublic.model_validate(self._request("GET", f"/v1/datasets/{_seg(dataset_id)}").json())

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{_seg(dataset_id)}")

    # -- jobs -------------------------------------------------------------------------------------------------

    def submit_job(self, spec: JobSpec | dict[str, Any]) -> Job:
        """Submit a job. A dict is sent as it is, so the server (the one judge of specs) reports any mistake."""
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
        return Job.bind(self._request("POST", "/v1/jobs", json=body).json(), self)

    def get_job(self, job_id: str) -> Job:
        return Job.bind(self._request("GET", f"/v1/jobs/{_seg(job_id)}").json(), self)

    def events(
        self, job_id: str, *, last_event_id: str | None = None, deadline: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """The job's Server-Sent Events ({id, event, data}) from after ``last_event_id`` until its final state.

        Raises ``SqueezeConnectionError`` if the connection drops (resume with the last id seen) and stops
        quietly at ``deadline`` (a ``time.monotonic()`` value). The server sends a keep-alive every 15 s.
        """
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        read_timeout = 30.0 if deadline is None else max(0.1, min(30.0, deadline - time.monotonic()))
        try:
            with self._http.stream(
                "GET",
                f"/v1/jobs/{_seg(job_id)}/events",
                headers=headers,
                timeout=httpx.Timeout(10.0, read=read_timeout),
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise api_error(response)
                for event in _parse_sse(response.iter_lines()):
                    yield event
                    if deadline is not None and time.monotonic() >= deadline:
                        return
        except httpx.ReadTimeout:
            if deadline is not None and time.monotonic() >= deadline - 0.05:
                return
            raise SqueezeConnectionError("the event stream stalled") from None
        except httpx.TransportError as exc:
            raise SqueezeConnectionError(f"event stream from {self.url} broke: {exc or type(exc).__name__}") from exc

    def list_jobs(
        self,
        *,
        status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobsPublic:
        """Your jobs, newest first; ``items`` are bound ``Job`` objects."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        page = self._request("GET", "/v1/jobs", params=params).json()
        return JobsPublic(items=[Job.bind(j, self) for j in page["items"]], next_cursor=page.get("next_cursor"))

    def cancel_job(self, job_id: str) -> Job:
        return Job.bind(self._request("POST", f"/v1/jobs/{_seg(job_id)}/cancel").json(), self)

    def capabilities(self) -> dict[str, Any]:
        """Formats x methods: what each needs and where it runs."""
        result: dict[str, Any] = self._request("GET", "/v1/capabilities").json()
        return result

    # -- artifacts --------------------------------------------------------------------------------------------

    def get_artifact(self, artifact_id: str) -> ArtifactPublic:
        return ArtifactPublic.model_validate(self._request("GET", f"/v1/artifacts/{_seg(artifact_id)}").json())

    def download_artifact(
        self,
        artifact: str | ArtifactPublic,
        dest: str | Path,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Download an artifact to ``dest`` (a file path, or an existing folder) and return the file's path.

        Bytes go to ``<dest>.part`` first; an existing ``.part`` is resumed with ``Range`` from its size. The
        whole file's sha256 must match the artifact's (its ``ETag``) before it is renamed to ``dest``. On a
        mismatch the bytes are deleted: a resumed download is then fetched once more from the start, a fresh one
        raises ``ChecksumMismatch``. After a network error the ``.part`` stays, and calling again resumes it.
        """
        art = artifact if isinstance(artifact, ArtifactPublic) else self.get_artifact(artifact)
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / Path(art.filename).name
        part = dest.with_name(dest.name + ".part")
        total = art.size_bytes
        offset = part.stat().st_size if part.exists() else 0
        if offset > total:
            part.unlink()
            offset = 0
        resumed = offset > 0
        digest = hashlib.sha256()
        if offset:
            with part.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
        if progress is not None:
            progress(offset, total)
        etag: str | None = None
        if offset < total:
            etag, offset, digest = self._fetch(art, part, offset, digest, progress)
        actual = digest.hexdigest()
        expected = {art.sha256, *([etag] if etag else [])}
        if expected != {actual}:
            part.unlink(missing_ok=True)
            if resumed:
                # The partial file was not a prefix of these bytes (another file, or damaged): fetch it whole once.
                return self.download_artifact(art, dest, progress)
            raise ChecksumMismatch(str(dest), etag or art.sha256, actual)
        os.replace(part, dest)
        return dest

    def _fetch(
        self,
        art: ArtifactPublic,
        part: Path,
        offset: int,
        digest: Any,
        progress: ProgressCallback | None,
    ) -> tuple[str | None, int, Any]:
        """Append the artifact's bytes from ``offset`` to ``part``; returns (ETag, bytes in part, digest)."""
        headers = {}
        if offset:
            # If-Range: if the bytes behind the URL changed, the server sends them whole (200) instead.
            headers = {"Range": f"bytes={offset}-", "If-Range": f'"{art.sha256}"'}
        try:
            # A server with presigned downloads answers 307 to its storage (httpx drops the API key on the way).
            url = f"/v1/artifacts/{_seg(art.id)}/download"
            with self._http.stream("GET", url, headers=headers, follow_redirects=True) as response:
                if response.status_code == 416 and offset:
                    part.unlink(missing_ok=True)  # our partial file is not a prefix the server recognises
                    return self._fetch(art, part, 0, hashlib.sha256(), progress)
                if response.status_code >= 400:
                    response.read()
                    raise api_error(response)
                etag = response.headers.get("etag", "").strip().removeprefix("W/").strip('"') or None
                if response.history:  # the storage's own ETag, not the sha256: verify against the artifact's
                    etag = None
                if response.status_code != 206 and offset:
                    offset, digest = 0, hashlib.sha256()  # the whole body came: start over
                elif response.status_code == 206:
                    start = response.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
                    if start != str(offset):
                        raise SqueezeAPIError(
                            response.status_code, "bad_range", f"asked for bytes from {offset}, got {start or '?'}"
                        )
                with part.open("ab" if offset else "wb") as f:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        f.write(chunk)
                        digest.update(chunk)
                        offset += len(chunk)
                        if progress is not None:
                            progress(offset, art.size_bytes)
        except httpx.TransportError as exc:
            raise SqueezeConnectionError(
                f"download of {art.id} interrupted at {offset} bytes ({exc or type(exc).__name__}); "
                f"run it again to resume from {part}"
            ) from exc
        return etag, offset, digest
