"""batch_invariance "chunk" over HTTP: a request's bytes are the same alone or in a crowd, the
same as `Model.sample(..., chunk_rows=...)` in-process, and the probe falls back when a chunk
is not invariant."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch

from difforge.common.png import png_pixels
from difforge.model import load
from tests.integration.serving_fixtures import (
    BatchSensitiveDenoiser,
    make_service,
    run,
    running,
    wrap_denoisers,
)

FAST = {"torch_threads": 1, "warmup_steps": 1, "batch_wait_ms": 300}
CROWD = [
    {"labels": [1, 2, 6, 7, 8], "seed": 100, "guidance": 3.0},
    {"labels": [3], "seed": 7, "guidance": 2.0},
    {"labels": [5], "seed": 8, "guidance": 4.0},
]


def _images(body: dict) -> list[np.ndarray]:
    return [png_pixels(base64.b64decode(img["png_base64"])) for img in body["images"]]


async def _alone_and_crowded(c) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    body = {**CROWD[1], "response_format": "json"}
    alone = _images((await c.post("/v1/generate", json=body)).json())[0]
    rs = await asyncio.gather(
        *[c.post("/v1/generate", json={**b, "response_format": "json"}) for b in CROWD]
    )
    assert all(r.status_code == 200 for r in rs)
    return alone, _images(rs[1].json())[0], [r.json() for r in rs]


@pytest.mark.parametrize(
    ("by", "chunk", "plan"),
    [
        ("size", 2, "chunk"),  # every network call has chunk_rows rows: the size never moves
        ("position", 2, "chunk"),  # rows from index 4 on never exist in a 2-row chunk
        ("position", 8, "per_sample"),  # they do in an 8-row chunk: the probe catches it
    ],
)
def test_chunked_calls_protect_pixels_from_batch_dependent_kernels(model_dir, by, chunk, plan):
    async def scenario():
        svc = make_service(model_dir, **FAST, batch_invariance="chunk", chunk_rows=chunk)
        wrap_denoisers(svc, lambda d: BatchSensitiveDenoiser(d, by))
        async with running(svc) as c:
            version = svc.router.production
            assert version.plan.mode == plan
            info = (await c.get("/v1/models")).json()["models"][0]["batching"]
            assert info == {"mode": plan, "invariant": True,
                            "chunk_rows": chunk if plan == "chunk" else None}  # fmt: skip
            alone, crowded, bodies = await _alone_and_crowded(c)
            assert max(bodies[0]["batch_images"]) > 1 or plan == "per_sample"
            assert bodies[1]["batch_invariant"] is True and bodies[1]["batching"] == info
            assert np.array_equal(alone, crowded)

    run(scenario())


def test_served_bytes_are_the_in_process_bytes_at_the_same_chunk(model_dir):
    """The unmodified model: HTTP alone and in a crowd == Model.sample(chunk_rows=2), and a lone
    guided image chunked by 2 is one 2-row forward, so also == plain Model.sample of it."""

    async def scenario():
        svc = make_service(model_dir, **FAST, batch_invariance="chunk", chunk_rows=2)
        async with running(svc) as c:
            alone, crowded, bodies = await _alone_and_crowded(c)
            assert max(bodies[0]["batch_images"]) > 1  # it did share a call
            return alone, crowded

    alone, crowded = run(scenario())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load(model_dir)
        kwargs = {"labels": [3], "seed": 7, "guidance": 2.0}
        chunked = model.sample(**kwargs, chunk_rows=2).images[0, 0].numpy()
        plain = model.sample(**kwargs).images[0, 0].numpy()
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(alone, chunked) and np.array_equal(crowded, chunked)
    assert np.array_equal(plain, chunked)
    assert 0 < chunked.mean() < 255


def test_chunk_rows_is_validated():
    from pydantic import ValidationError

    from difforge.serving import ServiceConfig

    with pytest.raises(ValidationError, match="chunk_rows"):
        ServiceConfig(chunk_rows=0)
    with pytest.raises(ValidationError, match="batch_invariance"):
        ServiceConfig(batch_invariance="chunks")
    assert ServiceConfig(chunk_rows=3).chunk_rows == 3
    assert ServiceConfig().batch_invariance == "kernels"  # the default (serving/invariance.py)


def test_cli_sample_with_chunk_rows_does_not_depend_on_the_batch_size(model_dir, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from difforge.cli import app

    runner = CliRunner()
    args = ["sample", "--model", str(model_dir), "--seed", "3", "--steps", "3"]
    args += ["--labels", "0,1,2,3,4", "--guidance", "2.5"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grids = []
        for flags in (["--batch-size", "1"], ["--batch-size", "5"], []):
            out = tmp_path / f"g{len(grids)}.png"
            chunk = ["--chunk-rows", "2"] if flags else []
            r = runner.invoke(app, [*args, *flags, *chunk, "--out", str(out)])
            assert r.exit_code == 0, r.output
            grids.append(np.asarray(Image.open(out)))
        bad = runner.invoke(app, [*args, "--chunk-rows", "0", "--out", str(tmp_path / "x.png")])
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(grids[0], grids[1])
    assert grids[0].shape == grids[2].shape and grids[0].std() > 0  # (uint8 hides the float
    # difference unchunked batches make on this tiny model: test_chunked.py checks it in float)
    assert bad.exit_code != 0 and "chunk-rows" in bad.output
