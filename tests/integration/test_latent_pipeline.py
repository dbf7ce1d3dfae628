"""A latent pipeline trained end to end by difforge on a few scenes (tiny nets, two steps each):
`train_vae` writes a VAE folder with its scaling factor; the same training loop trains a
slot-conditioned denoiser on its cached latents and exports vae/ + denoiser/; the model loads
strictly, samples 64x64 images through the library, the CLI and HTTP, and refuses a foreign VAE."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import difforge
from difforge.cli import app
from difforge.common.png import png_pixels
from difforge.data import load_scenes
from difforge.pipeline import ConditioningSpec, ModelIntegrityError, NetSpec, SlotsKey, sha256_file
from difforge.pipeline.artifact import load_component
from difforge.training import train
from difforge.training.config import TrainConfig
from difforge.training.vae import VAETrainConfig, encode_means, train_vae
from tests.integration.serving_fixtures import make_service, run, running

SCENES = {"kind": "scenes", "split": "train", "n": 16, "seed": 3}
TINY_VAE = {"image_size": 64, "latent_channels": 2, "base_channels": 4, "channel_mults": [1, 2, 2],
            "norm_groups": 4}  # fmt: skip
SPEC = ConditioningSpec(keys=(SlotsKey(dropout=0.2),))


def _unet(in_channels: int, size: int) -> NetSpec:
    return NetSpec(kind="unet", config={
        "in_channels": in_channels, "out_channels": in_channels, "image_size": size,
        "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
        "attention_resolutions": [size // 2], "head_dim": 8, "norm_groups": 4,
        "slot_grid": 2, "slot_classes": 11,
    })  # fmt: skip


def _train_config(**kw) -> TrainConfig:
    return TrainConfig(
        dataset=SCENES, conditioning=SPEC, batch_size=4, max_steps=2, log_every=1,
        sampling={"sampler": "euler", "steps": 2, "guidance": 2.0}, **kw,
    )  # fmt: skip


VAE_RECIPE = VAETrainConfig(
    net=NetSpec(kind="autoencoder", config=TINY_VAE), dataset=SCENES, batch_size=4, max_steps=2,
    scale_images=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "vae"
    train_vae(VAE_RECIPE, out, log=lambda m: None)
    return out


def test_train_vae_is_deterministic(vae_dir, tmp_path):
    again = tmp_path / "again"
    train_vae(VAE_RECIPE, again, log=lambda m: None)
    assert sha256_file(again / "model.safetensors") == sha256_file(vae_dir / "model.safetensors")


@pytest.fixture(scope="module")
def latent_model(vae_dir, tmp_path_factory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        cfg = _train_config(net=_unet(2, 16), vae=str(vae_dir), sigma_data=1.0)
        result = train(cfg, tmp_path_factory.mktemp("run") / "latent", progress=False)
    finally:
        mp.undo()
    return result.model_dir


def test_the_vae_folder_records_the_scaling_factor_of_its_latents(vae_dir):
    config, vae, sha, _ = load_component(vae_dir, "vae")
    assert sha == sha256_file(vae_dir / "model.safetensors")
    x = load_scenes(**{k: v for k, v in SCENES.items() if k != "kind"}).as_float()
    z = encode_means(vae, x)
    assert z.shape == (16, 2, 16, 16) and vae.decode(z).shape == (16, 1, 64, 64)
    assert config.latent_shape == (2, 16, 16) and config.image_shape == (1, 64, 64)
    assert (z * config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-4)


def test_the_latent_model_holds_both_components_and_decodes_to_pixels(latent_model, vae_dir):
    files = set(json.loads((latent_model / "manifest.json").read_text())["files"])
    assert {"vae/model.safetensors", "denoiser/model.safetensors", "pipeline.json"} <= files
    m = difforge.load(latent_model)
    assert m.image_shape == (1, 64, 64) and m.latent_shape == (2, 16, 16)
    vae_sha = sha256_file(vae_dir / "model.safetensors")
    assert m.components()["denoiser"]["base"] == {"vae": vae_sha}  # the VAE it was trained on
    card = (latent_model / "README.md").read_text()
    assert f"sha256 `{vae_sha}`" in card and "difforge train-vae --config vae_config.json" in card
    assert "A conditional (slots: slots key) diffusion model" in card and "--cond 'slots=" in card
    out = m.sample(cond={"slots": "_6/3_"}, n=2, seed=1)
    assert out.images.shape == (2, 1, 64, 64) and out.images.dtype == torch.uint8
    assert out.conditioning == {"slots": [[None, 6, 3, None]] * 2}
    assert out.captions == ("_6/3_", "_6/3_")
    assert torch.equal(m.sample(cond={"slots": "_6/3_"}, n=2, seed=1).images, out.images)


def test_a_slot_vector_is_one_value_for_all_images(latent_model):
    m = difforge.load(latent_model)
    plan = difforge.pipeline.resolve(m, {"slots": [None, 6, 3, None], "seed": 0})
    assert plan.n == 1  # four entries are the four slots of one image, not four images
    plan = difforge.pipeline.resolve(m, {"slots": ["1234", None], "seed": 0})
    assert plan.conditioning == {"slots": [[1, 2, 3, 4], None]}
    with pytest.raises(difforge.pipeline.RequestInvalid, match="slots"):
        difforge.pipeline.resolve(m, {"slots": [1, 2, 3, 12]})


def test_cli_samples_a_latent_model(latent_model, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(latent_model), "--cond", 'slots="1_/_2"', "--n", "2"]
    result = CliRunner().invoke(app, [*args, "--seed", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    grid = Image.open(out)
    assert json.loads(grid.text["conditioning"]) == {"slots": [[1, None, None, 2]] * 2}


def test_http_serves_a_latent_model(latent_model):
    async def scenario():
        async with running(make_service(latent_model, warmup_steps=1)) as c:
            r = await c.post("/v1/generate", json={"slots": ["_6/3_", "12/34"], "seed": 11})
            assert r.status_code == 200, r.text
            images = [png_pixels(base64.b64decode(i["png_base64"])) for i in r.json()["images"]]
            assert images[0].shape == (64, 64)
            alone = await c.post("/v1/generate", json={"slots": "12/34", "seeds": [12]})
            assert np.array_equal(png_pixels(alone.content), images[1])
            bad = await c.post("/v1/generate", json={"slots": "12/3"})
            assert bad.status_code == 422

    run(scenario())


def test_a_vae_that_is_not_the_one_trained_with_is_refused(latent_model, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(latent_model, swapped)
    weights = load_file(str(swapped / "vae" / "model.safetensors"))
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(swapped / "vae" / "model.safetensors"), metadata={"format": "x"})
    new_sha = sha256_file(swapped / "vae" / "model.safetensors")
    pipeline = json.loads((swapped / "pipeline.json").read_text())
    pipeline["components"]["vae"]["sha256"] = new_sha  # a forger fixes pipeline.json ...
    (swapped / "pipeline.json").write_text(json.dumps(pipeline))
    manifest = json.loads((swapped / "manifest.json").read_text())
    manifest["files"] = {n: sha256_file(swapped / n) for n in manifest["files"]}  # ... and this
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="made for another model"):
        difforge.load(swapped)


def test_both_components_load_strictly(latent_model, tmp_path):
    for part in ("vae", "denoiser"):
        bad = tmp_path / part
        shutil.copytree(latent_model, bad)
        path = bad / part / "model.safetensors"
        weights = load_file(str(path))
        weights.pop(sorted(weights)[0])
        save_file(weights, str(path))
        sha = sha256_file(path)
        pipeline = json.loads((bad / "pipeline.json").read_text())
        pipeline["components"][part]["sha256"] = sha
        for ref in pipeline["components"].values():
            ref["base"] = {k: sha if k == part else v for k, v in ref["base"].items()}
        (bad / "pipeline.json").write_text(json.dumps(pipeline))
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["files"] = {n: sha256_file(bad / n) for n in manifest["files"]}
        (bad / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelIntegrityError, match="missing keys"):
            difforge.load(bad)


def test_a_pixel_model_with_slots_is_a_denoiser_only_pipeline(tmp_path):
    result = train(_train_config(net=_unet(1, 64)), tmp_path / "pixel", progress=False)
    m = difforge.load(result.model_dir)
    assert m.vae is None and m.image_shape == m.latent_shape == (1, 64, 64)
    assert m.spec.names == ("slots",)
    assert m.sample(cond={"slots": "_1/2_"}, seed=0).images.shape == (1, 1, 64, 64)


def test_the_shipped_scenes_model_loads_and_samples():
    root = Path(__file__).resolve().parents[2] / "models" / "scenes-latent"
    m = difforge.load(root)
    assert m.image_shape == (1, 64, 64) and m.latent_shape == (4, 16, 16) and m.vae is not None
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) < 20 * 2**20
    out = m.sample(cond={"slots": "_6/3_"}, seed=0, steps=2)
    assert out.images.shape == (1, 1, 64, 64)
    info = CliRunner().invoke(app, ["info", "--model", str(root)])
    assert info.exit_code == 0 and "conditioned on slots" in info.output, info.output


def test_a_vae_can_start_from_a_pipelines_vae_subfolder(latent_model, tmp_path):
    _, _, sha, weights = load_component(latent_model / "vae", "vae")  # no manifest of its own
    manifest = json.loads((latent_model / "manifest.json").read_text())["files"]
    assert sha == manifest["vae/model.safetensors"]
    assert set(weights) == set(load_file(str(latent_model / "vae" / "model.safetensors")))
    out = train_vae(
        VAE_RECIPE.model_copy(update={"init": str(latent_model / "vae"), "max_steps": 1}),
        tmp_path / "vae2",
        log=lambda m: None,
    )
    config, _, _, _ = load_component(out["folder"], "vae")
    assert config.provenance["init_sha256"] == sha
    tampered = tmp_path / "tampered"
    shutil.copytree(latent_model, tampered)
    w = load_file(str(tampered / "vae" / "model.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in w.items()},
              str(tampered / "vae" / "model.safetensors"))  # fmt: skip
    with pytest.raises(ModelIntegrityError, match="modified"):
        load_component(tampered / "vae", "vae")


def test_a_denoiser_can_be_fine_tuned_from_a_model(latent_model, vae_dir, tmp_path):
    from difforge.core.errors import InvalidArgumentError
    from difforge.data import load_dataset
    from difforge.training.loop import Trainer

    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFORGE_CACHE", str(tmp_path / "cache"))
    try:
        cfg = _train_config(net=_unet(2, 16), vae=str(vae_dir), sigma_data=1.0)
        start = load_file(str(latent_model / "denoiser" / "model.safetensors"))
        trainer = Trainer(cfg.model_copy(update={"init": str(latent_model)}),
                          load_dataset(SCENES), tmp_path / "t", log=lambda m: None)  # fmt: skip
        assert all(torch.equal(v, start[k]) for k, v in trainer.net.state_dict().items())
        fresh = Trainer(cfg, load_dataset(SCENES), tmp_path / "f", log=lambda m: None)
        assert not all(torch.equal(v, start[k]) for k, v in fresh.net.state_dict().items())
        tuned = train(cfg.model_copy(update={"init": str(latent_model)}), tmp_path / "run",
                      progress=False)  # fmt: skip
        pipeline = json.loads((tuned.model_dir / "pipeline.json").read_text())
        sha = sha256_file(latent_model / "denoiser" / "model.safetensors")
        assert pipeline["provenance"]["init_sha256"] == sha
        wrong = cfg.model_copy(update={"init": str(latent_model), "net": _unet(1, 64), "vae": None})
        with pytest.raises(InvalidArgumentError, match="do not fit"):
            Trainer(wrong, load_dataset(SCENES), tmp_path / "w", log=lambda m: None)
    finally:
        mp.undo()
