"""The Squeeze client: a Python API (``squeeze.client.Squeeze``) and the client commands of the ``squeeze`` CLI.

Imports no torch, SQL or Celery: it needs httpx, pydantic and the service's pure schema modules only.
"""

from squeeze.client import Job, Squeeze
from squeeze.errors import (
    ChecksumMismatch,
    ConfigError,
    InvalidArgument,
    JobFailed,
    JobTimeout,
    SqueezeAPIError,
    SqueezeClientError,
    SqueezeConnectionError,
)
from squeeze.results import ResultTable

__all__ = [
    "ChecksumMismatch",
    "ConfigError",
    "InvalidArgument",
    "Job",
    "JobFailed",
    "JobTimeout",
    "ResultTable",
    "Squeeze",
    "SqueezeAPIError",
    "SqueezeClientError",
    "SqueezeConnectionError",
]
