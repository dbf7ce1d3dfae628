"""img2img and inpainting over HTTP (tiny 8x8 model, in-process): base64 PNG fields, the same
bytes alone or in a padded batch, edits batching only with compatible edits, the known region
kept, limits before compute (413/422), provenance and the audit log recording input hashes."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import torch

from difforge.common.png import png_bytes, png_pixels, png_text
from difforge.pipeline.editing import pixels_sha256
from difforge.serving import Limits
from tests.integration.serving_fixtures import make_service, run, running

FAST = {"torch_threads": 1, "warmup_steps": 1}
INIT = torch.randint(0, 256, (1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
MASK = torch.zeros(1, 8, 8, dtype=torch.uint8)
MASK[:, :, 4:] = 255  # white = generate the right half


def b64(img: torch.Tensor) -> str:
    return base64.b64encode(png_bytes(img)).decode()


def pixels(body: dict) -> dict[int, np.ndarray]:
    return {img["seed"]: png_pixels(base64.b64decode(img["png_base64"])) for img in body["images"]}


def test_edits_are_the_same_bytes_alone_or_batched_and_batch_only_with_their_kind(model_dir):
    inpaint = {"init_image": b64(INIT), "mask": b64(MASK), "labels": [2], "guidance": 2.0}
    img2img = {"init_image": b64(INIT), "strength": 0.5, "labels": [2], "guidance": 2.0}

    async def scenario():
        svc = make_service(model_dir, **FAST, batch_wait_ms=400)
        async with running(svc) as c:
            alone = {}
            for name, body in (("inpaint", inpaint), ("img2img", img2img)):
                r = await c.post(
                    "/v1/generate", json={**body, "seed": 7, "response_format": "json"}
                )
                assert r.status_code == 200, r.text
                assert r.json()["batch_images"] == [1]
                alone[name] = pixels(r.json())[7]
            crowd = [
                {**inpaint, "labels": [1, 3], "seeds": [100, 101]},
                {**inpaint, "seed": 7},
                {**img2img, "seed": 7},
                {**img2img, "strength": 0.5, "labels": [4], "seed": 300},
                {"labels": [5], "seed": 7, "guidance": 2.0},  # plain generation
            ]
            rs = await asyncio.gather(
                *[c.post("/v1/generate", json={**b, "response_format": "json"}) for b in crowd]
            )
            bodies = [r.json() for r in rs]
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
            calls = [b["batch_images"] for b in bodies]
            assert calls == [[3], [3], [2], [2], [1]], calls  # each kind its own padded call
            assert np.array_equal(pixels(bodies[1])[7], alone["inpaint"])
            assert np.array_equal(pixels(bodies[2])[7], alone["img2img"])
            for b in bodies[:2]:  # the kept left half is the init image's, to the byte
                for px in pixels(b).values():
                    assert np.array_equal(px[:, :4], INIT[0, :, :4].numpy())
            img = bodies[1]["images"][0]
            assert img["edit"] == {
                "strength": 1.0,
                "init_image_sha256": pixels_sha256(INIT),
                "mask_sha256": pixels_sha256(MASK),
            }
            text = png_text(base64.b64decode(img["png_base64"]))
            assert json.loads(text["edit"])["init_image_sha256"] == pixels_sha256(INIT)
            record = svc.audit.get(bodies[1]["request_id"])
            assert record["params"]["init_image_sha256"] == [pixels_sha256(INIT)]
            assert "init_image" not in record["params"]  # the log holds hashes, not images

    run(scenario())


def test_bad_edit_inputs_are_413_or_422_before_any_compute(model_dir):
    big = torch.zeros(1, 16, 16, dtype=torch.uint8)
    noisy = torch.randint(0, 256, (1, 8, 8), generator=torch.Generator().manual_seed(1))
    noisy_png = b64(noisy.to(torch.uint8))

    async def scenario():
        limits = Limits(max_image_bytes=100)
        svc = make_service(model_dir, **FAST, limits=limits, queue_size=1)
        async with running(svc) as c:
            nfe_before = svc.metrics.nfe.labels(svc.router.production.id)._value.get()
            cases = [
                ({"init_image": b64(big)}, 422, "wrong_size"),
                ({"init_image": "%%%"}, 422, "value_error"),
                ({"init_image": b64(MASK), "mask": b64(big)}, 422, "wrong_size"),
                ({"mask": b64(MASK)}, 422, "conflict"),
                ({"init_image": b64(MASK), "strength": 2}, 422, "range"),
                ({"init_image": noisy_png}, 413, "too_large"),  # 140 bytes > 100
            ]
            for body, status, kind in cases:
                r = await c.post("/v1/generate", json=body)
                assert r.status_code == status, (body, r.text)
                assert kind in [d["type"] for d in r.json()["detail"]], r.text
            assert svc.engine.depth == 0 and not svc.engine.jobs
            nfe = svc.metrics.nfe.labels(svc.router.production.id)._value.get()
            assert nfe == nfe_before  # nothing was sampled

    run(scenario())
