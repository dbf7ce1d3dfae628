"""The output filter stage and the human review queue over HTTP, in-process (httpx.ASGITransport)
with the tiny 8x8 model: held outputs are never returned before approval, refusals, bounded
storage, retention, audit entries and metrics."""

from __future__ import annotations

import json

import pytest
from fastapi.openapi.utils import get_openapi

from difforge.common.png import png_pixels
from difforge.serving import ApiKey, ServiceConfig, create_app, hash_key, png_text
from tests.integration.serving_fixtures import make_service, run, running

FAST = {"torch_threads": 1, "warmup_steps": 1, "batch_wait_ms": 0}
# 7 goes to review, 9 is refused, everything else passes
RULES = [
    {"kind": "conditioning", "key": "labels", "equals": [7], "name": "claims a product"},
    {"kind": "conditioning", "key": "labels", "equals": [9], "action": "refuse"},
]
ALICE, BOB, OPS = "alice-secret-1", "bob-secret-2", "ops-secret-3"


def _filters(**review) -> dict:
    return {"stage": [{"name": "policy", "options": {"rules": RULES}}], "review": review}


def _service(model_dir, filters=None, **overrides):
    settings = {"audit_db": ":memory:", **FAST, **overrides}
    config = ServiceConfig(filters=filters or _filters(), **settings)
    return make_service(model_dir, config)


def _keys() -> tuple[ApiKey, ...]:
    return (
        ApiKey(id="alice", sha256=hash_key(ALICE)),
        ApiKey(id="bob", sha256=hash_key(BOB)),
        ApiKey(id="ops", sha256=hash_key(OPS), scopes=("admin",)),
    )


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _no_image(response) -> None:
    """The answer carries no image: JSON without any PNG or pixel data."""
    assert response.headers["content-type"].startswith("application/json")
    assert b"png_base64" not in response.content and b"\x89PNG" not in response.content


def test_a_held_output_is_returned_only_after_approval(model_dir):
    async def scenario():
        svc = _service(model_dir, api_keys=_keys())
        async with running(svc, client_host="10.0.0.5") as c:  # not loopback: scopes count
            ok = await c.post("/v1/generate", json={"labels": 3, "seed": 1}, headers=auth(ALICE))
            assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
            prov = json.loads(png_text(ok.content)["filters"])
            assert prov["decision"] == "pass"
            assert prov["checks"][0]["filter"] == "policy" and prov["checks"][0]["version"] == "1"

            r = await c.post("/v1/generate", json={"labels": 7, "seed": 1}, headers=auth(ALICE))
            assert r.status_code == 202
            _no_image(r)
            rid = r.json()["request_id"]
            assert r.json()["poll"] == f"/v1/requests/{rid}"
            for _ in range(2):  # polling while pending: still nothing
                p = await c.get(f"/v1/requests/{rid}", headers=auth(ALICE))
                assert p.status_code == 202 and p.json()["status"] == "held"
                _no_image(p)
            other = await c.get(f"/v1/requests/{rid}", headers=auth(BOB))  # not bob's
            assert other.status_code == 404
            assert (await c.get("/v1/admin/review", headers=auth(ALICE))).status_code == 403
            no = await c.post(f"/v1/admin/review/{rid}/approve", headers=auth(ALICE))
            assert no.status_code == 403

            listed = (await c.get("/v1/admin/review", headers=auth(OPS))).json()
            assert [h["request_id"] for h in listed["held"]] == [rid]
            why = listed["held"][0]["filters"][0][0]
            assert why["decision"] == "review" and why["reasons"] == ["claims a product: labels=7"]
            assert listed["items"] == 1 and listed["bytes"] > 0
            shown = await c.get(
                f"/v1/admin/review/{rid}", headers=auth(OPS)
            )  # the reviewer sees it
            assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"

            a = await c.post(
                f"/v1/admin/review/{rid}/approve", json={"note": "a digit"}, headers=auth(OPS)
            )
            assert a.status_code == 200 and a.json()["state"] == "approved"
            again = await c.post(f"/v1/admin/review/{rid}/reject", headers=auth(OPS))
            assert again.status_code == 409  # already decided

            got = await c.get(f"/v1/requests/{rid}", headers=auth(ALICE))
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            assert got.content == shown.content
            text = png_text(got.content)
            assert text["request_id"] == rid and json.loads(text["filters"])["decision"] == "review"
            assert png_pixels(got.content).shape == (8, 8)
            row = svc.audit.get(rid)
            assert row["status"] == "review_approved" and row["key_id"] == "alice"
            assert row["detail"]["reviewer"] == "ops" and row["detail"]["note"] == "a digit"
            assert got.headers["x-output-sha256"] == row["output_sha256"]
            assert svc.audit.verify().ok
            metrics = (await c.get("/metrics", headers=auth(OPS))).text
            version = svc.router.production.id
            line = (
                f'difforge_filter_decisions_total{{decision="review",filter="policy",'
                f'version="{version}"}} 1.0'
            )
            assert line in metrics
            assert f'difforge_filter_pass_ratio{{version="{version}"}} 0.5' in metrics
            assert 'difforge_review_outcomes_total{outcome="approved"} 1.0' in metrics

    run(scenario())


def test_held_then_audited_with_filter_versions_and_a_chain(model_dir):
    async def scenario():
        svc = _service(model_dir)
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": [7, 3], "seed": 5})
            assert r.status_code == 202  # one image to review holds the whole answer
            rid = r.json()["request_id"]
            held = svc.audit.get(rid)
            assert held["status"] == "held" and held["http_status"] == 202
            filters = held["detail"]["filters"]
            assert filters["decision"] == "review"
            assert filters["filters"] == [{"name": "policy", "version": "1"}]
            assert [img[0]["decision"] for img in filters["images"]] == ["review", "pass"]
            assert held["output_sha256"] and held["params"]["seeds"] == [5, 6]

            info = (await c.get("/v1/models")).json()["filters"]
            assert info == {"stage": [{"name": "policy", "version": "1"}], "on_review": "hold"}
            rej = await c.post(f"/v1/admin/review/{rid}/reject", json={"note": "no"})
            assert rej.status_code == 200
            gone = await c.get(f"/v1/requests/{rid}")
            assert gone.status_code == 410 and "rejected" in gone.json()["detail"]
            assert (await c.get(f"/v1/admin/review/{rid}")).status_code == 404
            assert svc.audit.get(rid)["status"] == "review_rejected"

            refused = await c.post("/v1/generate", json={"labels": 9, "seed": 2})
            assert refused.status_code == 403
            assert refused.json()["detail"] == svc.config.filters.refusal_message
            rec = svc.audit.get(refused.headers["x-request-id"])
            assert rec["status"] == "refused" and rec["detail"]["filters"]["decision"] == "refuse"
            verify = (await c.get("/v1/audit/verify")).json()
            assert verify["ok"] and verify["rows"] == 3  # held, rejected, refused

            # the JSON answer carries every image's filter record too
            j = await c.post("/v1/generate", json={"labels": [1, 2], "seed": 3})
            assert j.status_code == 200
            assert [im["filters"]["decision"] for im in j.json()["images"]] == ["pass", "pass"]

    run(scenario())


def test_review_as_refusal_and_idempotent_replay_of_a_hold(model_dir):
    async def scenario():
        svc = _service(model_dir, filters={**_filters(), "on_review": "refuse"})
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": 7, "seed": 1})
            assert r.status_code == 403 and len(svc.screen.queue) == 0
        svc = _service(model_dir)
        async with running(svc) as c:
            h = {"Idempotency-Key": "hold-once"}
            first = await c.post("/v1/generate", json={"labels": 7, "seed": 1}, headers=h)
            second = await c.post("/v1/generate", json={"labels": 7, "seed": 1}, headers=h)
            assert first.status_code == second.status_code == 202
            assert second.headers["idempotent-replayed"] == "true"
            assert second.json()["request_id"] == first.json()["request_id"]
            assert len(svc.screen.queue) == 1

    run(scenario())


def test_bounded_storage_refuses_a_hold_that_does_not_fit(model_dir):
    async def scenario():
        svc = _service(model_dir, filters=_filters(max_items=1))
        async with running(svc) as c:
            first = await c.post("/v1/generate", json={"labels": 7, "seed": 1})
            assert first.status_code == 202
            full = await c.post("/v1/generate", json={"labels": 7, "seed": 2})
            assert full.status_code == 503 and "retry-after" in full.headers
            _no_image(full)
            assert svc.audit.get(full.headers["x-request-id"])["status"] == "refused"
            # deciding frees the room
            await c.post(f"/v1/admin/review/{first.json()['request_id']}/reject")
            assert (await c.post("/v1/generate", json={"labels": 7, "seed": 3})).status_code == 202
        svc = _service(model_dir, filters=_filters(max_bytes=64))  # smaller than one PNG
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": 7, "seed": 1})
            assert r.status_code == 503 and len(svc.screen.queue) == 0

    run(scenario())


def test_retention_expires_held_outputs(model_dir):
    async def scenario():
        svc = _service(model_dir, filters=_filters(retention_s=60))
        now = [1000.0]
        svc.screen.queue.clock = lambda: now[0]
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": 7, "seed": 1})
            rid = r.json()["request_id"]
            now[0] += 59
            assert (await c.get(f"/v1/requests/{rid}")).status_code == 202
            listed = (await c.get("/v1/admin/review")).json()["held"]
            assert listed[0]["expires_in_s"] == 1.0
            now[0] += 2
            gone = await c.get(f"/v1/requests/{rid}")
            assert gone.status_code == 410 and "no longer held" in gone.json()["detail"]
            assert svc.audit.get(rid)["status"] == "review_expired"
            late = await c.post(f"/v1/admin/review/{rid}/approve")
            assert late.status_code == 404
            m = (await c.get("/metrics")).text
            assert 'difforge_review_outcomes_total{outcome="expired"} 1.0' in m
            assert "difforge_review_held_outputs 0.0" in m

    run(scenario())


def test_a_restart_loses_held_outputs_and_says_so(model_dir, tmp_path):
    async def scenario():
        db = str(tmp_path / "audit.sqlite3")
        svc = _service(model_dir, audit_db=db)
        async with running(svc) as c:
            rid = (await c.post("/v1/generate", json={"labels": 7, "seed": 1})).json()["request_id"]
        svc = _service(model_dir, audit_db=db)  # a new process over the same audit log
        async with running(svc) as c:
            r = await c.get(f"/v1/requests/{rid}")
            assert r.status_code == 410 and "restarted" in r.json()["detail"]

    run(scenario())


def test_openapi_documents_the_review_routes(model_dir):
    app = create_app(_service(model_dir))
    doc = app.openapi()
    inferred = get_openapi(title="t", version="0", routes=app.routes)["paths"]
    routes = {(p, m) for p, ops in inferred.items() for m in ops}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented and ("/v1/admin/review/{request_id}/approve", "post") in routes
    assert "202" in doc["paths"]["/v1/generate"]["post"]["responses"]
    assert "410" in doc["paths"]["/v1/requests/{request_id}"]["get"]["responses"]
    plain = create_app(make_service(model_dir, ServiceConfig(audit_db=":memory:")))
    assert not any("review" in p for p in plain.openapi()["paths"])


def test_filters_that_do_not_fit_the_model_fail_at_start(model_dir):
    from difforge.core.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="do not fit"):  # the 28x28 feature net
        _service(model_dir, filters={"stage": [{"name": "quality"}]})
    with pytest.raises(ValueError, match="unknown filter"):
        ServiceConfig(filters={"stage": [{"name": "nsfw"}]})
    with pytest.raises(ValueError, match="threshold"):
        ServiceConfig(filters={"stage": [{"name": "quality", "options": {"threshold": 2}}]})
