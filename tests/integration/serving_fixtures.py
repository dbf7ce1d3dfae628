"""Shared by the serving tests: a tiny random model folder, a service over it, an in-process client.

The model is a difforge U-Net on 8x8 single-channel images with 10 classes and 8 base channels
(~20k parameters); its zero-initialised output layers are perturbed so the network's output
depends on its input (a zero output would make every batch trivially invariant).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import torch

from difforge.model import ModelConfig, NetSpec, SamplingDefaults, load, save_model
from difforge.nets import UNetConfig, build_net
from difforge.serving import ModelRouter, ModelVersion, Service, ServiceConfig, create_app

TINY_UNET = UNetConfig(
    in_channels=1,
    out_channels=1,
    image_size=8,
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=8,
    num_classes=10,
    norm_groups=4,
)


def make_tiny_model(
    folder: Path,
    *,
    seed: int = 0,
    name: str = "tiny",
    classes: int = 10,
    parameterization: str = "x0",
) -> Path:
    """Write a random tiny model folder (eps prediction, cosine VP process)."""
    cfg = UNetConfig(**{**TINY_UNET.to_dict(), "num_classes": classes})
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net("unet", cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    config = ModelConfig(
        name=name,
        net=NetSpec(kind="unet", config=cfg.to_dict()),
        process={"kind": "vp", "schedule": "cosine"},
        parameterization=parameterization,
        num_classes=classes,
        image_shape=(1, 8, 8),
        sampling=SamplingDefaults(sampler="dpmpp_2m", steps=4, guidance=2.0),
    )
    return save_model(folder, config, net.state_dict(), f"# {name}\n\nA random test model.\n")


def make_service(model_path: Path, config: ServiceConfig | None = None, **overrides) -> Service:
    """A Service over the model at `model_path`; `overrides` replace ServiceConfig fields."""
    config = config or ServiceConfig(audit_db=":memory:")
    if overrides:
        config = config.model_copy(update=overrides)
    return Service(config, ModelRouter(ModelVersion(load(model_path))))


@contextlib.asynccontextmanager
async def running(
    service: Service, client_host: str = "127.0.0.1", source=None, timeout: float = 120
) -> AsyncIterator[httpx.AsyncClient]:
    """Start the service (as the app's lifespan would, with its registry `source` if any), wait
    until it is ready, yield a client."""
    app = create_app(service, source)
    async with app.router.lifespan_context(app):
        await service.wait_ready(timeout=timeout)
        transport = httpx.ASGITransport(app=app, client=(client_host, 40000))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", timeout=timeout
        ) as client:
            yield client


async def until(predicate, timeout: float = 30.0, poll_s: float = 0.005) -> None:
    """Wait until `predicate()` is true; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "timed out waiting"
        await asyncio.sleep(poll_s)


class SlowDenoiser:
    """Wraps a denoiser so that every forward takes at least `delay` seconds: tests of deadlines
    and cancellation need a call that lasts, whatever the speed of the machine."""

    def __init__(self, denoiser, delay: float):
        self.denoiser, self.delay = denoiser, delay

    def __call__(self, x, sigma, cond=None):
        time.sleep(self.delay)
        return self.denoiser(x, sigma, cond)


def slow_down(service: Service, delay: float = 0.02) -> None:
    """Make every served version's forwards last `delay` seconds (after warm-up)."""
    wrap_denoisers(service, lambda d: SlowDenoiser(d, delay))


class BatchSensitiveDenoiser:
    """What a batched kernel may do to a sample, made large enough to change uint8 pixels:
    by="size" shifts the output with the forward batch size, by="position" shifts rows from
    index 4 on (a second thread's share of a split batch)."""

    def __init__(self, denoiser, by: str):
        self.denoiser, self.by = denoiser, by

    def __call__(self, x, sigma, cond=None):
        out = self.denoiser(x, sigma, cond)
        if self.by == "size":
            return out + 0.02 * x.shape[0]
        shift = torch.zeros_like(out)
        shift[4:] = 0.2
        return out + shift


def wrap_denoisers(service: Service, wrap) -> None:
    """Replace every served version's denoiser d by wrap(d) (for batch_invariance "kernels": the
    denoiser it serves with, made before warm-up so that the probe sees the wrapper)."""
    from difforge.serving.invariance import serving_model

    for _, version in service.router.versions():
        version.model = serving_model(version.model, service.config.batch_invariance)
        version.model.denoiser = wrap(version.model.denoiser)


def run(coro):
    """Run a test scenario coroutine to completion."""
    return asyncio.run(coro)
