"""What the client raises. Every one is a ``SqueezeClientError``; the CLI maps each kind to one exit code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from squeeze.client import Job


class SqueezeClientError(Exception):
    """Base of the client's errors."""


class ConfigError(SqueezeClientError):
    """A setting is missing (no API key) or the config file cannot be read."""


class InvalidArgument(SqueezeClientError, ValueError):
    """An argument the client refuses before asking the server (an empty id, a job without that artifact)."""


class SqueezeAPIError(SqueezeClientError):
    """The API answered with an error: its HTTP status and the envelope ``{"error": {code, message, details}}``."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


class SqueezeConnectionError(SqueezeClientError):
    """The server could not be reached, or stopped answering (connect, read or write failed or timed out)."""


class JobTimeout(SqueezeClientError, TimeoutError):
    """``Job.wait`` gave up; the job itself keeps running on the server."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(
            f"job {job.id} is still {job.status} ({job.progress:.0%}, {job.stage}) after {timeout:g}s; "
            "it keeps running on the server"
        )
        self.job = job
        self.timeout = timeout


class JobFailed(SqueezeClientError):
    """``Job.raise_for_status`` on a job that failed or was cancelled."""

    def __init__(self, job: Job) -> None:
        why = f": {job.error.code}: {job.error.message}" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{why}")
        self.job = job


class ChecksumMismatch(SqueezeClientError):
    """A download's sha256 is not the one the server announced; the bytes were deleted."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(f"{path}: sha256 {actual} does not match the expected {expected}; the download was deleted")
        self.path = path
        self.expected = expected
        self.actual = actual
