"""A mask-conditioned inpainting model fine-tuned from the tiny 8x8 model: a v2 pipeline whose
spec adds the masked_image key; the library, HTTP and CLI take it through init_image + mask."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from difforge.cli import app
from difforge.data import ImageDataset
from difforge.pipeline import load, resolve
from difforge.training.inpaint import InpaintTrainConfig, train_inpaint
from tests.integration.serving_fixtures import make_service, make_tiny_model, running
from tests.integration.test_serving_editing import INIT, MASK, b64, pixels

pytestmark = pytest.mark.usefixtures("one_thread")
LOWER = torch.zeros(1, 8, 8, dtype=torch.uint8)
LOWER[:, 4:] = 255


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    base = make_tiny_model(root / "base", seed=3)
    g = torch.Generator().manual_seed(0)
    data = ImageDataset("noise", torch.randint(0, 256, (64, 1, 8, 8), generator=g).to(torch.uint8),
                        torch.arange(64) % 10, 10)  # fmt: skip
    config = InpaintTrainConfig(name="tiny-inpaint", steps=4, batch_size=8, lr=1e-2)
    result = train_inpaint(base, config, root / "inpaint", data=data)
    assert result.steps == 4 and np.isfinite(result.final_loss)
    return result.folder


def test_the_model_reads_the_mask_and_keeps_the_known_region(inpaint_dir):
    model = load(inpaint_dir)
    assert model.spec.names == ("labels", "inpaint") and model.pipeline is not None
    assert model.net.conv_in.weight[:, 1:].abs().sum() > 0, "the new channels trained"
    plan = resolve(
        model,
        {"labels": [1, 2], "seeds": [5, 6], "init_image": [INIT, INIT], "mask": [LOWER, MASK],
         "guidance": 2.0, "steps": 3},
    )  # fmt: skip
    assert plan.conditioning["inpaint"] == ["init_image*mask"] * 2
    for row, un in zip(plan.rows, plan.uncond_rows, strict=True):
        assert torch.equal(row["inpaint"], un["inpaint"]) and int(un["labels"]) == 10
    lower_row = plan.rows[0]["inpaint"]
    assert torch.equal(lower_row[0, 4:], torch.ones(4, 8)) and not lower_row[1, 4:].any()
    out = model.generate(plan).images
    assert torch.equal(out[0, :, :4], INIT[:, :4]) and torch.equal(out[1, :, :, :4], INIT[..., :4])
    alone = model.sample(labels=[2], seed=6, init_image=INIT, mask=MASK, guidance=2.0, steps=3)
    assert torch.equal(alone.images[0], out[1]), "an image does not depend on its batch"
    # the conditioning reaches the net: other known pixels, other prediction in the hole
    x, sigma = torch.randn(1, 1, 8, 8), torch.tensor([1.0])
    a = model.denoiser(x, sigma, model.spec.collate([plan.rows[0]]))
    other = dict(plan.rows[0], inpaint=plan.rows[0]["inpaint"].clone())
    other["inpaint"][1, :4] = -other["inpaint"][1, :4]
    assert not torch.equal(a, model.denoiser(x, sigma, model.spec.collate([other])))
    plain = model.sample(labels=[4], seed=1, steps=3)  # no edit: nothing known
    assert plain.conditioning["inpaint"] == [None]


def test_http_inpaints_with_the_conditioned_model(inpaint_dir):
    body = {"init_image": b64(INIT), "mask": b64(MASK), "labels": [2], "seeds": [7, 8],
            "guidance": 2.0, "response_format": "json"}  # fmt: skip

    async def scenario():
        svc = make_service(inpaint_dir, torch_threads=1, warmup_steps=1)
        async with running(svc) as c:
            r = await c.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["images"][0]["conditioning"]["inpaint"] == "init_image*mask"
            for px in pixels(r.json()).values():  # the kept left half, to the byte
                assert np.array_equal(px[:, :4], INIT[0, :, :4].numpy())
            doc = await c.get("/openapi.json")  # the body schema names the key's one value
            assert doc.status_code == 200 and "init_image*mask" in json.dumps(doc.json())
            direct = await c.post("/v1/generate", json={**body, "inpaint": [[0.5]]})
            assert direct.status_code == 422 and "set from init_image and mask" in direct.text

    asyncio.run(scenario())


def test_cli_train_inpaint_refuses_in_one_line(inpaint_dir, tmp_path):
    result = CliRunner().invoke(
        app, ["train-inpaint", "--model", str(inpaint_dir), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: tiny-inpaint already takes a masked image"


def test_the_shipped_mnist_inpaint_model_loads_and_keeps_the_known_half():
    from difforge.data.mnist import load_mnist

    model = load("models/mnist-inpaint")
    assert model.spec.names == ("labels", "inpaint") and model.net.inpaint_channels == 2
    digit = load_mnist("test").images[0]  # (1, 28, 28) uint8
    mask = torch.zeros(1, 28, 28, dtype=torch.uint8)
    mask[:, 14:] = 255
    out = model.sample(labels=[None], seed=0, steps=2, init_image=digit, mask=mask, guidance=1.0)
    assert torch.equal(out.images[0, :, :14], digit[:, :14])


def test_cli_sample_inpaints_with_the_conditioned_model(inpaint_dir, tmp_path):
    from difforge.common.png import png_bytes, png_pixels, png_text
    from difforge.pipeline.editing import pixels_sha256

    (tmp_path / "in.png").write_bytes(png_bytes(INIT))
    (tmp_path / "mask.png").write_bytes(png_bytes(LOWER))
    args = ["sample", "--model", str(inpaint_dir), "--labels", "3", "--init-image",
            str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "2",
            "--seed", "1", "--out", str(tmp_path / "out.png")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = (tmp_path / "out.png").read_bytes()
    assert png_pixels(data).ndim == 3  # a captioned grid
    text = png_text(data)
    assert json.loads(text["edit"])["mask_sha256"] == [pixels_sha256(LOWER)]
    assert "init_image*mask" in text["conditioning"], text
