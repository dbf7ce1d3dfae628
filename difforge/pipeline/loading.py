"""`load(path)`: a model folder (v1 or v2) -> a `Model`, strictly, after verifying every file."""

from __future__ import annotations

from pathlib import Path

from difforge.pipeline.artifact import (
    CONFIG_FILE,
    PIPELINE_FILE,
    WEIGHTS_FILE,
    ModelIntegrityError,
    load_network,
    model_folder,
    read_config,
    read_pipeline,
    sha256_file,
    verify_manifest,
)
from difforge.pipeline.config import ModelConfig
from difforge.pipeline.layout import check_layout
from difforge.pipeline.model import Model


def load(path: str | Path) -> Model:
    """Load a model folder written by `save_model` or `save_pipeline` (safetensors only,
    manifest-checked, every component strict, base hashes cross-checked).

    Args:
        path: the model folder (or a file inside it).

    Returns:
        A Model whose `denoiser` wraps the EMA network, in eval mode.
    """
    folder = model_folder(path)
    files = verify_manifest(folder)
    from difforge.pipeline.cascade import is_cascade, load_cascade

    if PIPELINE_FILE in files and is_cascade(folder):  # base -> upsampler (pipeline/cascade.py)
        return load_cascade(folder)
    if PIPELINE_FILE not in files:
        config = read_config(folder / CONFIG_FILE, ModelConfig)
        net = load_network(folder, config)
        return Model(config, net, files[WEIGHTS_FILE], folder)
    pipeline, configs = read_pipeline(folder, files)
    refs = pipeline.components
    net = load_network(folder / refs["denoiser"].path, configs["denoiser"])
    vae = vae_config = None
    if "vae" in refs:
        vae_config = configs["vae"]
        vae = load_network(folder / refs["vae"].path, vae_config)
        if tuple(vae_config.latent_shape) != tuple(configs["denoiser"].image_shape):
            raise ModelIntegrityError(
                f"{folder}: the denoiser works on {tuple(configs['denoiser'].image_shape)} but "
                f"the VAE makes latents {tuple(vae_config.latent_shape)}"
            )
    layout = layout_config = None
    if "layout" in refs:  # the text-to-layout stage of planned slots (pipeline/layout.py)
        layout_config = configs["layout"]
        layout = load_network(folder / refs["layout"].path, layout_config)
    check_layout(pipeline.conditioning, layout_config, str(folder))
    # A pipeline's identity: pipeline.json, which records every component's weights sha256.
    sha = sha256_file(folder / PIPELINE_FILE)
    return Model(
        configs["denoiser"],
        net,
        sha,
        folder,
        pipeline=pipeline,
        vae=vae,
        vae_config=vae_config,
        layout=layout,
        layout_config=layout_config,
    )
