"""A latent text pipeline with a layout stage (planner -> slots, prompt -> cross-attention), a few
training steps: the library plans each image's slots from its prompt and seed (batched or alone,
the same bytes), a request may give its own layout, the CLI and HTTP take prompts, and the
pipeline folder holds the planner as its layout/ component."""

from __future__ import annotations

import base64

import pytest
import torch

from difforge.cli import main
from difforge.pipeline import load
from tests.integration.serving_fixtures import make_service, run, running
from tests.text_fixtures import train_tiny_scenes

PROMPT = "a thick 3 in the top left and a 7 in the bottom right"
BACKBONE = {"in_channels": 4, "out_channels": 4, "image_size": 16, "base_channels": 8,
            "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
            "head_dim": 8, "norm_groups": 4, "context_dim": 16, "slot_grid": 2,
            "slot_classes": 11}  # fmt: skip
ENC = {"vocab_size": 72, "max_tokens": 32, "width": 16, "depth": 1, "heads": 2}


@pytest.fixture(scope="module")
def layout_model(tmp_path_factory):
    from difforge.training.layout import LayoutTrainConfig, train_layout

    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    planner = tmp_path_factory.mktemp("layout") / "planner"
    train_layout(
        LayoutTrainConfig(
            net={"kind": "layout_planner", "config": {"cells": 4, "tokens": 11, "depth": 1,
                                                      "encoder": ENC}},
            dataset={"kind": "scene_captions", "split": "test", "limit": 64}, caption_seeds=1,
            max_steps=5, batch_size=16, eval_n=8, eval_seeds=1,
        ),
        planner, log=lambda _: None,
    )  # fmt: skip
    try:
        return train_tiny_scenes(
            tmp_path_factory, "configs/scenes_text_layout.json",
            {"backbone": BACKBONE, "encoder": ENC}, "scene-layout", init=None, layout=str(planner),
        )  # fmt: skip
    finally:
        mp.undo()


def test_the_pipeline_plans_slots_from_the_prompt_per_image(layout_model):
    m = load(layout_model)
    assert [k.kind for k in m.spec.keys] == ["text", "slots"] and m.spec.keys[1].planned
    assert m.layout is not None and (layout_model / "layout" / "model.safetensors").is_file()
    assert m.pipeline.provenance["layout_sha256"] == m.pipeline.components["layout"].sha256
    assert m.summary()["components"]["layout"]["net"] == "layout_planner"
    seen = []
    real = m.denoiser.forward

    def spy(x, sigma, cond=None, **kw):
        seen.append(cond["slots"].clone())
        return real(x, sigma, cond, **kw)

    m.denoiser.forward = spy
    s = m.sample(cond={"prompt": PROMPT}, seed=3, steps=2, guidance=1.0)
    assert s.conditioning["slots"] == ["planned"]
    assert (seen[0] <= 10).all()  # the network got a drawn layout, never the "planned" token
    assert all(torch.equal(c, seen[0]) for c in seen)  # one layout for the whole trajectory
    both = m.sample(cond={"prompt": [PROMPT, "two sevens"]}, seeds=[3, 4], steps=2, guidance=1.0)
    assert torch.equal(both.images[0], s.images[0])  # batched or alone, the same bytes
    seen.clear()
    m.sample(cond={"prompt": PROMPT, "slots": "3_/_7"}, seed=3, steps=2, guidance=1.0)
    assert seen[0].tolist() == [[3, 10, 10, 7]]  # a layout the request gives is used as given


def test_cli_and_http_take_a_prompt_and_a_layout(layout_model, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["sample", "--model", str(layout_model), "--prompt", PROMPT, "--n", "2", "--steps", "2"]
    with pytest.raises(SystemExit) as ok:
        main([*argv, "--seed", "0", "--out", str(out)])
    assert ok.value.code == 0 and out.stat().st_size > 0

    async def scenario():
        svc = make_service(layout_model, torch_threads=1, warmup_steps=1)
        async with running(svc) as c:
            body = {"prompt": PROMPT, "seed": 1, "steps": 2, "response_format": "json"}
            r = await c.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            assert base64.b64decode(r.json()["images"][0]["png_base64"])[:4] == b"\x89PNG"
            given = await c.post("/v1/generate", json={**body, "slots": "_7/3_"})
            assert given.status_code == 200, given.text
            bad = await c.post("/v1/generate", json={**body, "slots": "x7/3_"})
            assert bad.status_code == 422 and "slots" in bad.text

    run(scenario())
