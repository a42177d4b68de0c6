"""The process that parses uploaded models holds no credentials, reaches no network, and has bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from worker.sandbox import sandbox_env

PROBE = """
import json, os, socket, sys
from worker.sandbox import confine
confine(**json.loads(sys.argv[1]))
out = {}
try:
    socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    out["redis"] = "reachable"
except OSError as exc:
    out["redis"] = type(exc).__name__
try:
    bytearray(512 * 2**20)
    out["alloc"] = "ok"
except MemoryError:
    out["alloc"] = "MemoryError"
print(json.dumps(out))
"""


def _probe(**limits: object) -> dict[str, str]:
    args = {"memory_bytes": None, "cpu_seconds": None, "isolate_network": False, "parent_pid": os.getpid(), **limits}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_without_confinement_the_probe_sees_everything() -> None:
    assert _probe() == {"redis": "reachable", "alloc": "ok"}


def test_confined_child_has_no_network_and_bounded_memory() -> None:
    got = _probe(isolate_network=True, memory_bytes=400 * 2**20)
    assert got["alloc"] == "MemoryError"
    # A new network namespace has no route to the host's services (where the OS lets us create one: root here).
    assert got["redis"] != "reachable"


def test_child_environment_carries_no_settings_or_credentials(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SQUEEZE_DATABASE_URL", "postgresql://user:secret@db/squeeze")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    env = sandbox_env(tmp_path)
    assert not [k for k in env if k.startswith(("SQUEEZE_", "AWS_"))]
    assert "secret" not in json.dumps(env)
    assert env["HOME"] == str(tmp_path) and env["TMPDIR"].startswith(str(tmp_path))
