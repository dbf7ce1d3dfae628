"""Tiny super-resolution models for the tests: a random 8x8 class-conditional base (the serving
tests' tiny model), a random 8x8 -> 16x16 upsampler (a v2 pipeline with one low_res key), and a
cascade folder of the two. Output layers are perturbed so outputs depend on the inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from difforge.nets import UNetConfig, build_net
from difforge.pipeline import ConditioningSpec, LowResKey, ModelConfig, NetSpec, SamplingDefaults
from difforge.pipeline.artifact import save_pipeline
from difforge.pipeline.cascade import save_cascade
from tests.integration.serving_fixtures import make_tiny_model

UP_UNET = UNetConfig(
    in_channels=1,
    out_channels=1,
    image_size=16,
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(),
    head_dim=8,
    norm_groups=4,
    low_res_channels=1,
)
LOW_RES = LowResKey(size=8, level=0.1, max_level=0.5)


def make_tiny_upsampler(folder: Path, *, seed: int = 1, name: str = "tiny-up") -> Path:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net("unet", UP_UNET)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    config = ModelConfig(
        name=name,
        net=NetSpec(kind="unet", config=UP_UNET.to_dict()),
        process={"kind": "ve", "sigma_min": 0.002, "sigma_max": 80.0},
        parameterization="edm",
        image_shape=(1, 16, 16),
    )
    pipeline = {
        "name": name,
        "conditioning": ConditioningSpec(keys=(LOW_RES,)),
        "sampling": SamplingDefaults(sampler="dpmpp_2m", steps=3, guidance=1.0),
        "image_shape": (1, 16, 16),
    }
    card = f"# {name}\n\nA random test upsampler.\n"
    return save_pipeline(folder, pipeline, {"denoiser": (config, net.state_dict())}, card)


def make_tiny_cascade(root: Path) -> tuple[Path, Path, Path]:
    """(cascade, base, upsampler) folders under `root`."""
    base = make_tiny_model(root / "base")
    up = make_tiny_upsampler(root / "up")
    cascade = save_cascade(root / "cascade", base, up, upsampler_settings={"steps": 2})
    return cascade, base, up


def low_res_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 1, 8, 8) random images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g).to(torch.uint8)
