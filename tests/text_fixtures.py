"""A tiny random text-to-image model folder for the text tests (8x8 images, ~30k parameters).

A word-level tokenizer trained on a handful of captions; a text encoder in front of a tiny U-Net
or DiT; output layers perturbed so the output depends on the input and on the prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difforge.data.tokenizer import train_tokenizer
from difforge.nets import build_net
from difforge.pipeline import (
    ConditioningSpec,
    ModelConfig,
    NetSpec,
    SamplingDefaults,
    TextKey,
    save_pipeline,
)

CORPUS = ["a 7", "a thick 7", "the digit seven", "a thin 3", "the digit three", "seven", "three"]
MAX_TOKENS = 6
ENCODER = {"vocab_size": 16, "max_tokens": MAX_TOKENS, "width": 16, "depth": 1, "heads": 2}
BACKBONES = {
    "unet": {
        "image_size": 8,
        "base_channels": 8,
        "channel_mults": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [4],
        "head_dim": 8,
        "norm_groups": 4,
        "context_dim": 16,
    },
    "dit": {
        "image_size": 8,
        "patch_size": 2,
        "width": 16,
        "depth": 2,
        "heads": 2,
        "context_dim": 16,
    },
}


def tiny_text_spec(max_tokens: int = MAX_TOKENS) -> ConditioningSpec:
    tok = train_tokenizer(CORPUS)
    key = TextKey(tokenizer=tok.to_json(), max_tokens=max_tokens, examples=("a 7", "a 3"))
    return ConditioningSpec(keys=(key,))


def tiny_text_net(backbone: str = "unet", seed: int = 0) -> torch.nn.Module:
    config = {"backbone_kind": backbone, "backbone": BACKBONES[backbone], "encoder": ENCODER}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net("text_conditioned", config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


def make_tiny_text_model(folder: Path, backbone: str = "unet", seed: int = 0) -> Path:
    net = tiny_text_net(backbone, seed)
    config = ModelConfig(
        name="tiny-text",
        net=NetSpec(kind="text_conditioned", config=net.config.to_dict()),
        process={"kind": "vp", "schedule": "cosine"},
        parameterization="x0",
        image_shape=(1, 8, 8),
    )
    pipeline = {
        "name": "tiny-text",
        "conditioning": tiny_text_spec(),
        "sampling": SamplingDefaults(sampler="dpmpp_2m", steps=4, guidance=2.0),
        "image_shape": (1, 8, 8),
    }
    card = "# tiny-text\n\nA random test model.\n"
    return save_pipeline(folder, pipeline, {"denoiser": (config, net.state_dict())}, card)


def train_tiny_scenes(tmp_path_factory, config: str, net_config: dict, name: str, **fields):
    """Three training steps of a scenes text recipe (`config`) on 16 test scenes, its net's
    config updated by `net_config` (a tiny backbone and encoder), more TrainConfig `fields` on
    top; returns the exported model folder."""
    from difforge.training import load_config, train

    cfg = load_config(config)
    net = cfg.net.model_copy(update={"config": {**cfg.net.config, **net_config}})
    cfg = cfg.model_copy(
        update={
            "dataset": {"kind": "scene_captions", "split": "test", "limit": 16},
            "net": net,
            "max_steps": 3,
            "batch_size": 4,
            "checkpoint_every": 10,
            "log_every": 1,
            "sampling": cfg.sampling.model_copy(update={"steps": 2}),
            **fields,
        }
    )
    return train(cfg, tmp_path_factory.mktemp("run") / name, progress=False).model_dir
