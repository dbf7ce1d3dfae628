"""A toy two-component pipeline (a tiny VAE + a tiny latent denoiser, random weights): it saves,
loads strictly, refuses a swapped or corrupted component, and samples through the library, the
CLI and HTTP with the same bytes."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import difforge
from difforge.cli import app
from difforge.common.png import png_pixels
from difforge.nets import AutoencoderConfig, UNetConfig, build_net
from difforge.pipeline import (
    ConditioningSpec,
    ModelConfig,
    ModelIntegrityError,
    NetSpec,
    SamplingDefaults,
    VAEConfig,
    save_pipeline,
    sha256_file,
)
from tests.integration.serving_fixtures import make_service, run, running

VAE = AutoencoderConfig(
    in_channels=1, image_size=16, latent_channels=2, base_channels=8, channel_mults=(1, 2),
    norm_groups=4,
)  # fmt: skip
LATENT_UNET = UNetConfig(
    in_channels=2, out_channels=2, image_size=8, base_channels=8, channel_mults=(1, 2),
    num_res_blocks=1, attention_resolutions=(4,), head_dim=8, num_classes=10, norm_groups=4,
)  # fmt: skip


def _random(kind: str, config, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net(kind, config)
    with torch.no_grad():  # perturb zero-initialised layers so the output depends on the input
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.state_dict()


def make_tiny_pipeline(folder: Path, *, vae_seed: int = 1, name: str = "toy-latent") -> Path:
    denoiser = _toy_denoiser_config(name)
    vae = _toy_vae_config(scaling_factor=0.8)
    pipeline = {
        "name": name,
        "conditioning": ConditioningSpec.for_classes(10),
        "sampling": SamplingDefaults(sampler="dpmpp_2m", steps=3, guidance=2.0),
        "image_shape": (1, 16, 16),
    }
    components = {
        "denoiser": (denoiser, _random("unet", LATENT_UNET, 0)),
        "vae": (vae, _random("autoencoder", VAE, vae_seed)),
    }
    card = f"# {name}\n\nA random two-component test pipeline.\n"
    return save_pipeline(folder, pipeline, components, card, base={"denoiser": {"vae": ""}})


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "toy")


def test_a_pipeline_folder_has_components_and_one_manifest(toy):
    manifest = json.loads((toy / "manifest.json").read_text())
    assert manifest["format"] == "difforge-pipeline/2"
    assert set(manifest["files"]) == {
        "pipeline.json",
        "README.md",
        "denoiser/config.json",
        "denoiser/model.safetensors",
        "vae/config.json",
        "vae/model.safetensors",
    }
    m = difforge.load(toy)
    assert m.image_shape == (1, 16, 16) and m.latent_shape == (2, 8, 8)
    parts = m.summary()["components"]
    vae_sha = sha256_file(toy / "vae" / "model.safetensors")
    assert parts["vae"]["sha256"] == vae_sha and parts["denoiser"]["base"] == {"vae": vae_sha}
    assert parts["vae"]["parameters"] > 0 and parts["denoiser"]["parameters"] > 0
    assert oct((toy / "vae" / "model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_sampling_decodes_once_to_pixel_shape(toy):
    m = difforge.load(toy)
    out = m.sample(labels=[1, 2, 3], seed=5)
    assert out.images.dtype == torch.uint8 and out.images.shape == (3, 1, 16, 16)
    assert torch.equal(m.sample(labels=[1, 2, 3], seed=5).images, out.images)
    plan = difforge.pipeline.resolve(m, {"labels": [1, 2, 3], "seed": 5})
    latents, _ = m.sample_latents(plan.rows, plan)
    assert latents.shape == (3, 2, 8, 8)
    assert torch.equal(m.decode(latents), out.images)  # decode is the one pixel path
    # decode is per image: an image's pixels do not depend on what is decoded beside it
    assert torch.equal(m.decode(latents[2:]), out.images[2:])


def test_a_vae_swapped_in_from_another_model_is_refused_naming_both_hashes(toy, tmp_path):
    other = make_tiny_pipeline(tmp_path / "other", vae_seed=99)
    swapped = tmp_path / "swapped"
    shutil.copytree(toy, swapped)
    shutil.rmtree(swapped / "vae")
    shutil.copytree(other / "vae", swapped / "vae")
    # A careful forger also rewrites the manifest and pipeline.json's component hash ...
    new_sha = sha256_file(swapped / "vae" / "model.safetensors")
    pipeline = json.loads((swapped / "pipeline.json").read_text())
    old_sha = pipeline["components"]["vae"]["sha256"]
    pipeline["components"]["vae"]["sha256"] = new_sha
    (swapped / "pipeline.json").write_text(json.dumps(pipeline))
    manifest = json.loads((swapped / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = sha256_file(swapped / name)
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    # ... but the denoiser still records the VAE it was trained with.
    with pytest.raises(ModelIntegrityError) as e:
        difforge.load(swapped)
    assert old_sha[:12] in str(e.value) and new_sha[:12] in str(e.value)
    assert "made for another model" in str(e.value)


def test_a_corrupted_component_fails_the_manifest(toy, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(toy, bad)
    blob = bytearray((bad / "vae" / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "vae" / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ModelIntegrityError, match=r"vae/model\.safetensors is corrupted"):
        difforge.load(bad)


def test_save_refuses_a_base_hash_that_does_not_match(tmp_path):
    with pytest.raises(ModelIntegrityError, match="made for another model"):
        save_pipeline(
            tmp_path / "x",
            {"name": "x", "image_shape": (1, 16, 16)},
            {
                "denoiser": (_toy_denoiser_config(), _random("unet", LATENT_UNET, 0)),
                "vae": (_toy_vae_config(), _random("autoencoder", VAE, 1)),
            },
            "# x\n",
            base={"denoiser": {"vae": "0" * 64}},
        )
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def _toy_vae_config(scaling_factor: float = 1.0) -> VAEConfig:
    return VAEConfig(
        net=NetSpec(kind="autoencoder", config=VAE.to_dict()),
        scaling_factor=scaling_factor,
        image_shape=(1, 16, 16),
        latent_shape=VAE.latent_shape,
    )


def _toy_denoiser_config(name: str = "x") -> ModelConfig:
    return ModelConfig(
        name=name,
        net=NetSpec(kind="unet", config=LATENT_UNET.to_dict()),
        process={"kind": "vp", "schedule": "cosine"},
        parameterization="x0",
        num_classes=10,
        image_shape=VAE.latent_shape,
    )


def test_cli_info_and_sample_on_a_pipeline(toy, tmp_path):
    runner = CliRunner()
    info = runner.invoke(app, ["info", "--model", str(toy)])
    assert info.exit_code == 0, info.output
    assert "component vae: autoencoder" in info.output and "made for vae" in info.output
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(toy), "--labels", "1,2", "--seed", "5", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    from PIL import Image

    grid = Image.open(out)
    assert json.loads(grid.text["conditioning"]) == {"labels": [1, 2]}
    assert grid.text["model_sha256"] == difforge.load(toy).sha256


def test_http_generates_pipeline_images_batch_invariantly(toy):
    async def scenario():
        async with running(make_service(toy, warmup_steps=1)) as c:
            r = await c.post("/v1/generate", json={"labels": [4, 5], "seed": 11})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["batch_invariant"] is True
            images = [png_pixels(base64.b64decode(i["png_base64"])) for i in body["images"]]
            assert images[0].shape == (16, 16) and not np.array_equal(images[0], images[1])
            assert [i["conditioning"] for i in body["images"]] == [{"labels": 4}, {"labels": 5}]
            alone = await c.post("/v1/generate", json={"labels": [5], "seeds": [12]})
            assert np.array_equal(png_pixels(alone.content), images[1])  # same seed, same bytes

    run(scenario())


def test_the_registry_stores_and_loads_a_pipeline(toy, tmp_path):
    from difforge.registry import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}", tmp_path / "artifacts")
    info = reg.register(toy, name="toy").info
    loaded = reg.load_version("toy", info.version)
    assert loaded.sha256 == difforge.load(toy).sha256 and loaded.vae is not None
    assert torch.equal(
        loaded.sample(labels=[2], seed=3).images,
        difforge.load(toy).sample(labels=[2], seed=3).images,
    )
    report = reg.verify()
    assert report.problems == [] and report.artifacts_checked >= 6  # every component file
