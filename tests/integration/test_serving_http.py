"""HTTP behaviour of the service, driven in-process through httpx.ASGITransport with a tiny model:
images and provenance, batch invariance, validation, health, metrics, audit and replay."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import numpy as np
import pytest

from difforge.common.png import png_pixels
from difforge.serving import Limits, ServiceConfig, png_text
from tests.helpers import tamper_sqlite
from tests.integration.serving_fixtures import (
    BatchSensitiveDenoiser,
    make_service,
    run,
    running,
    slow_down,
    wrap_denoisers,
)

FAST = {"torch_threads": 1, "warmup_steps": 1}
JSON = {"content-type": "application/json"}
PROVENANCE_KEYS = {
    "model",
    "model_sha256",
    "model_version",
    "sampler",
    "steps",
    "guidance",
    "seed",
    "conditioning",
    "request_id",
    "created",
    "synthetic",
}


def _images(body: dict) -> list[np.ndarray]:
    return [png_pixels(base64.b64decode(img["png_base64"])) for img in body["images"]]


def test_one_image_is_a_png_with_provenance(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST)
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": [3], "seed": 7, "guidance": 2.5})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            text = png_text(r.content)
            assert set(text) >= PROVENANCE_KEYS
            assert text["synthetic"] == "true" and text["seed"] == "7"
            assert json.loads(text["conditioning"]) == {"labels": 3}
            assert text["model_sha256"] == svc.router.production.model.sha256
            assert text["request_id"] == r.headers["x-request-id"]
            assert (text["sampler"], text["steps"], text["guidance"]) == ("dpmpp_2m", "4", "2.5")
            assert png_pixels(r.content).shape == (8, 8)
            assert len(r.headers["x-output-sha256"]) == 64

    run(scenario())


def test_several_images_come_as_json_with_the_same_provenance(model_dir):
    async def scenario():
        async with running(make_service(model_dir, **FAST)) as c:
            r = await c.post("/v1/generate", json={"labels": [1, 2, 3], "seed": 40})
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            body = r.json()
            assert body["synthetic"] is True and body["batch_invariant"] is True
            # the default mode, named in the response as in /v1/models
            assert body["batching"] == {"mode": "kernels", "invariant": True, "chunk_rows": None}
            assert all(img["synthetic"] is True for img in body["images"])
            assert [img["seed"] for img in body["images"]] == [40, 41, 42]
            assert [img["conditioning"]["labels"] for img in body["images"]] == [1, 2, 3]
            for img in body["images"]:
                text = png_text(base64.b64decode(img["png_base64"]))
                assert set(text) >= PROVENANCE_KEYS and text["seed"] == str(img["seed"])
                assert text["request_id"] == body["request_id"]
            images = _images(body)
            assert not np.array_equal(images[0], images[1])  # different seeds, different images
            cycled = await c.post("/v1/generate", json={"n": 2, "seed": 40})  # no labels: cycle
            assert [img["conditioning"] for img in cycled.json()["images"]] == [
                {"labels": 0},
                {"labels": 1},
            ]
            null = await c.post("/v1/generate", json={"labels": [None, None], "seed": 40})
            assert [img["conditioning"]["labels"] for img in null.json()["images"]] == [None, None]

    run(scenario())


def test_pixels_are_identical_alone_or_in_any_batch(model_dir):
    """The same (seed, label, guidance) gives the same uint8 pixels whatever else shares its call."""
    targets = [(3, 7, 2.0), (5, 8, 4.0), (0, 9, 1.0)]  # label, seed, guidance (1.0: unguided)

    async def scenario():
        svc = make_service(model_dir, **FAST, batch_wait_ms=400)
        async with running(svc) as c:
            alone = {}
            for lab, seed, w in targets:
                body = {"labels": [lab], "seed": seed, "guidance": w, "response_format": "json"}
                r = (await c.post("/v1/generate", json=body)).json()
                assert r["batch_images"] == [1]
                alone[seed] = _images(r)[0]
            crowd = [
                {"labels": [1, 2], "seeds": [100, 101], "guidance": 3.0},
                {"labels": [3], "seed": 7, "guidance": 2.0},
                {"labels": [5], "seed": 8, "guidance": 4.0},
                {"labels": [4, 0, 6], "seeds": [200, 9, 201], "guidance": 1.0},
                {"labels": [7, 8, 9, 1, 2], "seed": 300, "guidance": 1.0},
            ]
            rs = await asyncio.gather(
                *[c.post("/v1/generate", json={**b, "response_format": "json"}) for b in crowd]
            )
            bodies = [r.json() for r in rs]
            assert all(r.status_code == 200 for r in rs)
            assert [b["batch_images"] for b in bodies[:3]] == [[4], [4], [4]]  # shared one call
            assert bodies[3]["batch_images"] == [8]  # 3 + 5 unguided images shared one call
            got = {
                img["seed"]: px
                for b in bodies
                for img, px in zip(b["images"], _images(b), strict=True)
            }
            for _, seed, _ in targets:
                assert np.array_equal(got[seed], alone[seed]), f"seed {seed} changed in a batch"
                assert 0 < got[seed].mean() < 255

    run(scenario())


@pytest.mark.parametrize(
    ("mode", "by", "plan", "identical"),
    [
        ("pad", "size", "pad", True),
        ("off", "size", "off", False),  # the control: without fixed shapes, pixels move
        ("pad", "position", "per_sample", True),  # the probe catches it and falls back
        ("kernels", "size", "per_sample", True),  # kernels that move: the probe catches them
        ("kernels", "position", "per_sample", True),
    ],
)
def test_fixed_call_shapes_protect_pixels_from_batch_dependent_kernels(
    model_dir, mode, by, plan, identical
):
    """Kernels whose output depends on the batch (amplified here so uint8 pixels show it)."""

    async def scenario():
        svc = make_service(model_dir, **FAST, batch_wait_ms=300, batch_invariance=mode)
        wrap_denoisers(svc, lambda d: BatchSensitiveDenoiser(d, by))
        async with running(svc) as c:
            assert svc.router.production.plan.mode == plan
            body = {"labels": [3], "seed": 7, "guidance": 2.0, "response_format": "json"}
            alone = _images((await c.post("/v1/generate", json=body)).json())[0]
            crowd = [
                {"labels": [1, 2, 6, 7, 8], "seed": 100, "guidance": 3.0},
                body,
                {"labels": [5], "seed": 8, "guidance": 4.0},
            ]
            rs = await asyncio.gather(
                *[c.post("/v1/generate", json={**b, "response_format": "json"}) for b in crowd]
            )
            batched = _images(rs[1].json())[0]
            assert max(rs[0].json()["batch_images"]) > 1 or plan == "per_sample"
            assert rs[1].json()["batch_invariant"] is (mode != "off")
            assert np.array_equal(alone, batched) is identical

    run(scenario())


def test_padded_calls_are_bitwise_invariant_in_float(model_dir):
    """Below the uint8 rounding: the sampler output itself is bitwise equal at every position."""
    import torch

    from difforge.model import load
    from difforge.serving.batching import BatchKey, Row, sample_rows

    model = load(model_dir)
    key = BatchKey("v", "euler_ancestral", 3, "karras", (1, 8, 8), True)

    def cond(label: int):
        return model.spec.resolve({"labels": label}, 1)[0]

    target = Row(seed=5, cond=cond(2), guidance=3.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, _ = sample_rows(model, key, [target], pad_to=4)
        for pos in range(4):
            rows = [Row(seed=50 + i, cond=cond(i), guidance=1.5 + i) for i in range(4)]
            rows[pos] = target
            x, _ = sample_rows(model, key, rows)
            assert torch.equal(x[pos], ref[0]), pos
    finally:
        torch.set_num_threads(threads)


def test_validation_errors_are_422_or_413_and_cost_no_queue_slot(model_dir):
    bad_bodies = [
        {"steps": 10_000},
        {"n": 17},
        {"labels": [10]},
        {"labels": [1], "guidance": 25},
        {"seed": 2**64},
        {"sampler": "nope"},
        {"labels": [1], "extra": 1},
        {"seeds": [1, 2], "n": 3},
    ]

    async def scenario():
        svc = make_service(model_dir, **FAST, queue_size=1)
        async with running(svc) as c:
            for body in bad_bodies:
                r = await c.post("/v1/generate", json=body)
                assert r.status_code == 422, body
                detail = r.json()["detail"]
                assert detail and all(d["loc"][0] == "body" and d["msg"] for d in detail)
            raw = [b'{"guidance": NaN, "labels": [1]}', b"[]", b"{", b'{"steps": "4"}']
            for content in raw:
                r = await c.post(
                    "/v1/generate", content=content, headers={"content-type": "application/json"}
                )
                assert r.status_code == 422, content
            big = json.dumps({"labels": [1] * 10_000}).encode()
            r = await c.post("/v1/generate", content=big, headers=JSON)
            assert r.status_code == 413 and r.json()["detail"][0]["type"] == "body_too_large"
            assert svc.engine.depth == 0 and not svc.engine.jobs
            ok = await c.post("/v1/generate", json={"labels": [1], "seed": 1})  # queue of 1 free
            assert ok.status_code == 200
            metrics = (await c.get("/metrics")).text
            assert 'difforge_errors_total{reason="validation",role="none"} 12.0' in metrics
            assert 'difforge_errors_total{reason="body_too_large",role="none"} 1.0' in metrics

    run(scenario())


def test_health_and_readiness_follow_warm_up(model_dir):
    gate = threading.Event()

    async def scenario():
        svc = make_service(model_dir, **FAST)
        warm = svc._warm_sync
        svc._warm_sync = lambda version: (gate.wait(60), warm(version))[1]
        from difforge.serving import create_app

        app = create_app(svc)
        import httpx

        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                assert (await c.get("/v2/health/live")).status_code == 200
                assert (await c.get("/v2/health/ready")).status_code == 503
                r = await c.post("/v1/generate", json={"labels": [1]})
                assert r.status_code == 503 and "retry-after" in r.headers
                invalid = await c.post("/v1/generate", json={"labels": [1], "steps": 0})
                assert invalid.status_code == 422  # a bad request is a 4xx even while warming
                gate.set()
                await svc.wait_ready()
                assert (await c.get("/v2/health/ready")).json() == {"ready": True}
                models = (await c.get("/v1/models")).json()["models"]
                assert models[0]["ready"] and models[0]["batching"]["invariant"]

    try:
        run(scenario())
    finally:
        gate.set()


def test_a_slow_batch_does_not_block_health_or_metrics(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST)
        async with running(svc) as c:
            slow_down(svc, 0.025)
            slow = asyncio.create_task(
                c.post("/v1/generate", json={"labels": [1], "steps": 40, "sampler": "euler"})
            )
            for _ in range(3000):
                if svc.engine.jobs and next(iter(svc.engine.jobs.values())).step > 0:
                    break
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            for path in ("/v2/health/live", "/metrics", "/v1/models"):
                t0 = loop.time()
                assert (await c.get(path)).status_code == 200
                assert loop.time() - t0 < 0.5, path
            assert not slow.done()  # the batch was still running while those were answered
            assert (await slow).status_code == 200

    run(scenario())


def test_metrics_are_exposed_with_conventional_names(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST, batch_invariance="pad")  # pads: padding counted
        async with running(svc) as c:
            await c.post("/v1/generate", json={"labels": [1, 2], "seed": 3})
            text = (await c.get("/metrics")).text
            version = svc.router.production.id
            for needle in [
                'difforge_http_request_duration_seconds_count{method="POST",route="/v1/generate",status="200"} 1.0',
                "difforge_queue_wait_seconds_count 1.0",
                f'difforge_batch_size_images_sum{{version="{version}"}} 2.0',
                f'difforge_batch_padding_images_total{{version="{version}"}} 2.0',
                f'difforge_images_total{{sampler="dpmpp_2m",version="{version}"}} 2.0',
                f'difforge_nfe_total{{version="{version}"}} 4.0',
                f'difforge_image_cpu_seconds_count{{version="{version}"}} 2.0',
                f'difforge_model_info{{name="tiny",role="production",version="{version}"}} 1.0',
                "difforge_queue_depth_requests 0.0",
                "difforge_inflight_requests 0.0",
                'difforge_denoising_step_seconds_count{sampler="dpmpp_2m",',
            ]:
                assert needle in text, needle

    run(scenario())


def test_audit_log_records_verifies_and_replays(model_dir, tmp_path):
    """A logged request, replayed from its audit record, reproduces the output sha256."""
    db = tmp_path / "audit.sqlite3"

    async def scenario():
        svc = make_service(model_dir, **FAST, audit_db=str(db))
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": [2, 4], "n": 2, "guidance": 1.5})
            assert r.status_code == 200
            body = r.json()
            await c.post("/v1/generate", json={"steps": 0})  # a 422 is logged too
            record = (await c.get(f"/v1/requests/{body['request_id']}")).json()["record"]
            assert record["output_sha256"] == body["output_sha256"]
            assert record["status"] == "ok" and record["key_id"] == "loopback"
            assert record["model_sha256"] == svc.router.production.model.sha256
            replay = await c.post("/v1/generate", json=record["params"])
            assert replay.json()["output_sha256"] == body["output_sha256"]
            assert replay.json()["request_id"] != body["request_id"]
            verify = (await c.get("/v1/audit/verify")).json()
            assert verify["ok"] and verify["rows"] == 3

    run(scenario())
    tamper_sqlite(
        db,
        "DROP TRIGGER audit_no_update",
        "UPDATE audit SET output_sha256 = 'ff' WHERE seq = 1",
    )
    from difforge.serving import AuditLog

    v = AuditLog(db).verify()
    assert not v.ok and v.first_bad_seq == 1


def test_config_limits_bound_steps_and_samplers(model_dir):
    limits = Limits(max_steps=3, allowed_samplers=("euler",))

    async def scenario():
        config = ServiceConfig(audit_db=":memory:", limits=limits, **FAST)
        async with running(make_service(model_dir, config)) as c:
            r = await c.post("/v1/generate", json={"labels": [1], "steps": 4, "sampler": "euler"})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
            r = await c.post("/v1/generate", json={"labels": [1], "steps": 3})  # default dpmpp_2m
            assert r.status_code == 422 and "euler" in r.json()["detail"][0]["msg"]
            ok = await c.post("/v1/generate", json={"labels": [1], "steps": 3, "sampler": "euler"})
            assert ok.status_code == 200

    run(scenario())
