"""The vp_time grid over HTTP (in-process, tiny model): accepted per request, recorded in the
provenance, equal to the library's pixels; a bad grid is a 422 naming the allowed ones. (Before
this test the service batched on the model's default grid and served Karras pixels for any
requested grid while its provenance named the requested one.)"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from difforge.common.png import png_pixels
from difforge.model import load
from tests.integration.serving_fixtures import make_service, run, running

FAST = {"torch_threads": 1, "warmup_steps": 1, "batch_wait_ms": 0}
BODY = {"labels": [3, 5], "seed": 11, "steps": 4, "response_format": "json", "grid": "vp_time"}


@pytest.mark.parametrize("grid", ["vp_time", "vp_time_mid"])
def test_a_request_samples_on_vp_time_and_a_bad_grid_is_a_422(model_dir, grid):
    svc = make_service(model_dir, **FAST)

    async def scenario():
        async with running(svc) as c:
            ok = await c.post("/v1/generate", json={**BODY, "grid": grid})
            bad = await c.post("/v1/generate", json={**BODY, "grid": "linear"})
            schema = (await c.get("/openapi.json")).json()
            listed = (await c.get("/v1/models")).json()["grids"]
        return ok, bad, schema, listed

    ok, bad, schema, listed = run(scenario())
    assert ok.status_code == 200, ok.text
    assert bad.status_code == 422 and grid in bad.text
    assert grid in str(schema) and grid in listed  # the page's grid choices
    body = ok.json()
    assert {i["grid"] for i in body["images"]} == {grid}  # the plan's grid, in the provenance
    served = [png_pixels(base64.b64decode(i["png_base64"])) for i in body["images"]]
    model = load(model_dir)
    ours = model.sample(labels=[3, 5], seed=11, steps=4, grid=grid).images
    karras = model.sample(labels=[3, 5], seed=11, steps=4, grid="karras").images
    for img, mine in zip(served, ours, strict=True):
        np.testing.assert_array_equal(img.reshape(mine.shape), mine.numpy())
    assert not torch.equal(ours, karras), "the grid changed nothing: the test could not fail"
