"""A tiny EDM teacher and a distilled student of it, for the distillation and fast-route tests."""

from __future__ import annotations

from pathlib import Path

import torch

from difforge.nets import UNetConfig, build_net
from difforge.pipeline import ModelConfig, NetSpec, SamplingDefaults, save_model
from difforge.training.distill import DistillConfig, distill

TINY = UNetConfig(
    in_channels=1, out_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2),
    num_res_blocks=1, attention_resolutions=(), head_dim=8, num_classes=10, norm_groups=4,
    emb_mult=1,
)  # fmt: skip


def make_teacher(folder: Path, seed: int = 0) -> Path:
    """A random tiny class-conditional EDM model on 8x8 (random weights, so outputs differ)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net("unet", TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    config = ModelConfig(
        name="tiny-teacher",
        net=NetSpec(kind="unet", config=TINY.to_dict()),
        process={"kind": "ve", "sigma_min": 0.002, "sigma_max": 80.0},
        parameterization="edm",
        num_classes=10,
        image_shape=(1, 8, 8),
        sampling=SamplingDefaults(sampler="dpmpp_2m", steps=6, guidance=2.0),
        provenance={"dataset": "toy"},
    )
    return save_model(folder, config, net.state_dict(), "# tiny-teacher\n")


def tiny_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    return images, torch.randint(0, 10, (n,), generator=gen)


def make_student(teacher: Path, out: Path) -> Path:
    """A 2-step progressive student of `teacher` after 3 steps on random data."""
    cfg = DistillConfig(
        method="progressive", teacher=str(teacher), steps=3, batch_size=8,
        student_steps=2, ema_halflife_steps=0,
    )  # fmt: skip
    return distill(cfg, out, data=tiny_data(), log=lambda _: None)
