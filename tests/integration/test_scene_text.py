"""A latent text model on captioned scenes, three training steps: it samples 64x64 images from
a scene prompt through the library, `difforge sample --prompt` and HTTP `prompt`, and the scenes
prompt-following benchmark scores it."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from difforge.cli import main
from difforge.common.png import png_pixels
from difforge.pipeline import load
from difforge.serving import png_text
from tests.integration.serving_fixtures import make_service, run, running
from tests.text_fixtures import train_tiny_scenes

PROMPT = "a thick 3 in the top left and a 7 in the bottom right"
BACKBONE = {"in_channels": 4, "out_channels": 4, "image_size": 16, "base_channels": 8,
            "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
            "head_dim": 8, "norm_groups": 4, "context_dim": 16}  # fmt: skip


@pytest.fixture(scope="module")
def scene_text_model(tmp_path_factory):
    from difforge.training import load_config

    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    recipe = "configs/scenes_text_unet.json"
    encoder = {**load_config(recipe).net.config["encoder"], "width": 16, "depth": 1}
    try:
        return train_tiny_scenes(
            tmp_path_factory, recipe, {"backbone": BACKBONE, "encoder": encoder}, "scene-text"
        )
    finally:
        mp.undo()


def test_library_samples_a_scene_from_a_prompt(scene_text_model):
    m = load(scene_text_model)
    assert m.spec.keys[0].kind == "text" and m.vae is not None
    s = m.sample(cond={"prompt": PROMPT}, seed=0, steps=2)
    assert s.captions == (PROMPT,) and np.asarray(s.images).shape == (1, 1, 64, 64)
    again = m.sample(cond={"prompt": [PROMPT, "two sevens"]}, seeds=[0, 1], steps=2)
    assert torch.equal(again.images[0], s.images[0])  # batched or alone, the same image


def test_cli_prompt_on_a_latent_text_model(scene_text_model, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["sample", "--model", str(scene_text_model), "--prompt", PROMPT, "--n", "1"]
    with pytest.raises(SystemExit) as ok:
        main([*argv, "--negative-prompt", "a 1", "--steps", "2", "--seed", "0", "--out", str(out)])
    assert ok.value.code == 0
    assert PROMPT in json.dumps(png_text(out.read_bytes()))


def test_http_prompt_on_a_latent_text_model(scene_text_model):
    async def scenario():
        svc = make_service(scene_text_model, torch_threads=1, warmup_steps=1)
        async with running(svc) as c:
            r = await c.post(
                "/v1/generate",
                json={"prompt": PROMPT, "seed": 1, "steps": 2, "response_format": "json"},
            )
            assert r.status_code == 200, r.text
            img = png_pixels(base64.b64decode(r.json()["images"][0]["png_base64"]))
            assert np.asarray(img).shape[-2:] == (64, 64)
            bad = await c.post("/v1/generate", json={"prompt": " and ".join(["a 7"] * 20)})
            assert bad.status_code == 422 and "limit is 31" in bad.text

    run(scenario())


def test_benchmark_scores_a_text_model_per_category(scene_text_model, extractor):
    from benchmarks.prompt_following import score
    from benchmarks.prompt_following_scenes import CATEGORIES, first_per_category, prompt_set
    from difforge.data.scene_captions import fit_scene_thresholds
    from difforge.evaluation.scenes import judge_clauses

    prompts = first_per_category(prompt_set(), 1)
    thresholds = fit_scene_thresholds()

    def judge_fn(images, ps):
        return judge_clauses(extractor, images, [p["clauses"] for p in ps], thresholds, True)

    r = score(load(scene_text_model), prompts, 1, 2.0, 2, judge_fn, CATEGORIES, batch=4)
    assert set(r) == set(CATEGORIES) and all(v["n"] == 1 for v in r.values())
    assert all(0.0 <= v["fraction"] <= v["fraction_stated"] <= 1.0 for v in r.values())


def test_data_preview_prints_scene_captions(tmp_path, capsys):
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as ok:
        main(["data", "preview", "scene_captions:test", "--n", "2", "--out", str(out)])
    assert ok.value.code == 0 and out.is_file()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("0: ") and lines[2].startswith("1: ")


def test_captioned_scenes_share_the_latent_cache_of_their_pixels(tmp_path, monkeypatch):
    from difforge.data import load_dataset, load_scenes
    from difforge.training.vae import encoded_dataset

    monkeypatch.setenv("DIFFORGE_CACHE", str(tmp_path))
    spec = {"kind": "scene_captions", "split": "test", "limit": 8}
    a, b = load_dataset(spec), load_dataset({**spec, "seed": 1})
    assert a.content_hash != b.content_hash and a.images_hash == b.images_hash
    assert load_dataset({"kind": "scene_captions", "split": "test"}).images_hash == (
        load_scenes("test").content_hash
    )
    first = encoded_dataset("models/scenes-latent/vae", a)
    again = encoded_dataset("models/scenes-latent/vae", b)  # other captions, same pixels: a hit
    assert first.seconds > 0 and again.seconds == 0.0
    assert torch.equal(first.latents, again.latents)
