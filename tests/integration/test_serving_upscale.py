"""POST /v1/upscale (tiny 8x8 -> 16x16 upsampler, in-process): base64 PNG in, the same bytes as
the library and alone or batched, limits before compute (413/422), a clear 422 on a model that is
no upsampler, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from difforge.common.png import png_bytes, png_pixels
from difforge.pipeline import load
from difforge.serving import Limits
from tests.integration.serving_fixtures import make_service, make_tiny_model, run, running
from tests.upscale_fixtures import low_res_images, make_tiny_upsampler

FAST = {"torch_threads": 1, "warmup_steps": 1}
IMAGES = low_res_images(3, seed=4)


def b64(img) -> str:
    return base64.b64encode(png_bytes(img)).decode()


@pytest.fixture(scope="module")
def up_dir(tmp_path_factory):
    return make_tiny_upsampler(tmp_path_factory.mktemp("up") / "tiny-up")


def test_upscale_over_http_matches_the_library_alone_or_batched(up_dir):
    library = load(up_dir).upscale(IMAGES, seeds=[7, 8, 9])

    async def scenario():
        svc = make_service(up_dir, **FAST, batch_wait_ms=300)
        async with running(svc) as c:
            r = await c.post("/v1/upscale", json={"image": b64(IMAGES[0]), "seed": 7})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "image/png"
            alone = png_pixels(r.content)
            assert alone.shape[:2] == (16, 16)
            assert np.array_equal(alone.reshape(16, 16), library.images[0, 0].numpy())
            bodies = [
                {"image": [b64(IMAGES[1]), b64(IMAGES[2])], "seeds": [8, 9]},
                {"image": b64(IMAGES[0]), "seed": 7},
            ]
            rs = await asyncio.gather(
                *[c.post("/v1/upscale", json={**b, "response_format": "json"}) for b in bodies]
            )
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
            got = {
                img["seed"]: png_pixels(base64.b64decode(img["png_base64"])).reshape(16, 16)
                for r in rs
                for img in r.json()["images"]
            }
            for i, s in enumerate([7, 8, 9]):
                assert np.array_equal(got[s], library.images[i, 0].numpy()), s
            doc = (await c.get("/openapi.json")).json()
            body = doc["paths"]["/v1/upscale"]["post"]["requestBody"]["content"]
            schema = body["application/json"]["schema"]
            assert schema["required"] == ["image"] and "guidance" not in schema["properties"]

    run(scenario())


def test_upscale_limits_and_errors_before_compute(up_dir, tmp_path):
    big = b64(low_res_images(1, seed=1)[0])  # a random 8x8 PNG is > 64 bytes

    async def scenario():
        svc = make_service(up_dir, **FAST, limits=Limits(max_image_bytes=64))
        async with running(svc) as c:
            r = await c.post("/v1/upscale", json={"image": big, "seed": 1})
            assert r.status_code == 413, r.text
            assert r.json()["detail"][0]["loc"] == ["body", "low_res"]
            wide = b64(low_res_images(1)[0].repeat(1, 2, 2)[:, :16, :16] * 0)
            r = await c.post("/v1/upscale", json={"image": wide})
            assert r.status_code in (413, 422), r.text
            r = await c.post("/v1/upscale", json={"seed": 1})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
            r = await c.post("/v1/upscale", json={"image": "not base64!", "level": 0.3})
            assert r.status_code == 422
            assert ["body", "level"] in [d["loc"] for d in r.json()["detail"]]
            r = await c.post("/v1/upscale", json={"image": "@@@"})
            assert r.status_code == 422 and "base64" in r.text

    run(scenario())

    async def wrong_size():
        svc = make_service(up_dir, **FAST)
        async with running(svc) as c:
            r = await c.post(
                "/v1/upscale", json={"image": b64(low_res_images(1)[0].repeat(1, 2, 2))}
            )
            assert r.status_code == 422 and "is 16x16; the model takes 8x8" in r.text

    run(wrong_size())

    async def not_an_upsampler():
        svc = make_service(make_tiny_model(tmp_path / "tiny"), **FAST)
        async with running(svc) as c:
            r = await c.post("/v1/upscale", json={"image": b64(IMAGES[0])})
            assert r.status_code == 422 and "not an upsampler" in r.text

    run(not_an_upsampler())


def test_a_served_cascade_generates_at_the_upsampler_size(tmp_path):
    from tests.upscale_fixtures import make_tiny_cascade

    cascade_dir, _, _ = make_tiny_cascade(tmp_path)
    want = load(cascade_dir).sample(labels=[4], seed=3).images[0, 0].numpy()

    async def scenario():
        svc = make_service(cascade_dir, **FAST)
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": [4], "seed": 3, "guidance": 2.0})
            assert r.status_code == 200, r.text
            assert np.array_equal(png_pixels(r.content).reshape(16, 16), want)

    run(scenario())
