from __future__ import annotations

from tests.conftest import make_user
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.routes import api_routes


def test_health_needs_no_key_and_readiness_checks_dependencies(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_every_v1_route_needs_a_key(client) -> None:
    public = {"/healthz", "/readyz"}
    checked = 0
    for route in api_routes(client.app.routes):
        if route.path in public:
            continue
        for method in route.methods:
            checked += 1
            path = route.path.replace("{model_id}", "mdl_x").replace("{dataset_id}", "dst_x")
            path = path.replace("{job_id}", "job_x").replace("{artifact_id}", "art_x")
            r = client.request(method, path)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["code"] in {"missing_api_key", "invalid_api_key"}
    assert checked >= 16  # every route of the app was really enumerated


def test_malformed_revoked_and_query_keys_get_401(client, clean_db) -> None:
    from app.auth.service import revoke_key
    from app.db import session_scope

    key = make_user("carol")
    ok = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/models", headers=ok).status_code == 200
    for bad in ("Bearer nope", "Bearer sqz_x_y", "Basic abc", f"Bearer {key}x", "Bearer "):
        r = client.get("/v1/models", headers={"Authorization": bad})
        assert r.status_code == 401, bad
    assert client.get(f"/v1/models?api_key={key}").status_code == 401
    with session_scope() as s:
        revoke_key(s, key_or_prefix=key)
    assert client.get("/v1/models", headers=ok).status_code == 401


def test_other_users_resources_are_404_and_admins_see_all(client, alice, bob) -> None:
    m = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())}).json()
    job = client.post("/v1/jobs", headers=alice, json={"model_id": m["id"], "dataset_id": d["id"]}).json()
    for path in (
        f"/v1/models/{m['id']}",
        f"/v1/models/{m['id']}/download",
        f"/v1/datasets/{d['id']}",
        f"/v1/jobs/{job['id']}",
    ):
        r = client.get(path, headers=bob)
        assert r.status_code == 404 and r.json()["error"]["code"].endswith("_not_found"), path
    assert client.delete(f"/v1/models/{m['id']}", headers=bob).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    r = client.post("/v1/jobs", headers=bob, json={"model_id": m["id"]})
    assert r.status_code == 404
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        assert client.get(path, headers=bob).json()["items"] == []
    admin = {"Authorization": f"Bearer {make_user('root', admin=True)}"}
    assert client.get(f"/v1/models/{m['id']}", headers=admin).status_code == 200
    assert len(client.get("/v1/jobs", headers=admin).json()["items"]) == 1


def test_unknown_route_and_method_use_the_error_envelope(client, alice) -> None:
    r = client.get("/v1/nothing", headers=alice)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.put("/v1/models", headers=alice)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openapi_document_is_valid_and_documents_the_error_envelope(client) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert "HTTPValidationError" not in r.text  # FastAPI's own 422 body is replaced by ours everywhere
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path in ("/healthz", "/readyz"):
                continue
            assert op.get("summary") and op.get("description"), (method, path)
            for code in ("401", "422"):
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, code)
