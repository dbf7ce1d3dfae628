"""Noise sources: where a sampler's randomness comes from, seeded per sample.

One generator per sample (as EDM's per-image RNG): sample i's noise depends only on its own seed
and on how many draws came before, never on which other samples share its batch. Noise is drawn
on the CPU and moved to the device, so a seed gives the same noise on every device. Not on
every CPU: torch's normal_ draws through a vectorized Box-Muller under AVX2 / AVX-512, whose values
differ from the scalar kernel's in the last bits (a third of them), so machines of different
instruction sets agree to float32 round-off, not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from difforge.core.denoiser import CPU
from difforge.core.errors import InvalidArgumentError

MAX_SEED = 2**64 - 1


class NoiseSource(Protocol):
    """`noise(like)` returns standard normal noise with the shape, dtype and device of `like`."""

    def __call__(self, like: Tensor) -> Tensor: ...


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise InvalidArgumentError("need at least one seed (one per sample)")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not (0 <= s <= MAX_SEED):
            raise InvalidArgumentError(f"seeds must be integers in [0, 2**64 - 1], got {s!r}")
    return seeds


def _splitmix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mix."""
    z = (z + 0x9E3779B97F4A7C15) & MAX_SEED
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MAX_SEED
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MAX_SEED
    return z ^ (z >> 31)


def stream_seeds(seeds: Sequence[int], stream: int) -> list[int]:
    """Per-sample seeds of an independent stream `stream` >= 1 (0 is the seeds themselves):
    seed' = splitmix64(splitmix64(seed) ^ stream). Each derived seed depends on its own sample's
    seed only, so a second consumer of randomness (an editing hook) is batch-invariant and never
    shifts the sampler's own draws."""
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
        raise InvalidArgumentError(f"noise stream must be an integer >= 0, got {stream!r}")
    seeds = check_seeds(seeds)
    return seeds if stream == 0 else [_splitmix64(_splitmix64(s) ^ stream) for s in seeds]


class PerSampleNoise:
    """Independent torch generators, one per sample, for one sampling call.

    Args:
        seeds: one seed per sample, in batch order.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = check_seeds(seeds)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def draw(self, shape: Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """Standard normal noise of shape (len(seeds), *shape), float32.

        Row i is filled in place by generator i: the same values, bit for bit, as
        `torch.randn(shape, generator=g_i)` stacked (normal_ on a contiguous float32 block draws
        by element count, whatever its offset), without one tensor per sample and a copy. One
        sample is one `randn`: ancestral samplers draw after every network call, when each op
        and Python line runs cache-cold, and the loop costs twice the call there at batch 1.
        """
        if len(self.generators) == 1:
            out = torch.randn((1, *shape), generator=self.generators[0])
        else:
            out = torch.empty((len(self.generators), *shape))  # (B, *shape) float32
            for row, g in zip(out.unbind(0), self.generators, strict=True):
                row.normal_(generator=g)
        if device is None or device == CPU or out.device == torch.device(device):
            return out
        return out.to(device)

    def draw_run(self, shape: Sequence[int], count: int) -> list[Tensor]:
        """`count` successive `draw(shape)`s (on CPU), bitwise, from one `normal_` per sample.

        torch's float32 `normal_` on a contiguous block of >= 16 values fills it with uniforms
        in order, then maps each aligned group of 16 through Box-Muller (its scalar kernel and
        its AVX2 / AVX-512 ones alike; only a ragged tail of a block is redrawn). When one
        draw's size is a multiple of 16, a block of `count` draws is therefore the draws one
        after the other (tests/unit/test_noise_upfront.py holds this on every run), at one
        kernel launch instead of `count`; other sizes draw one by one."""
        per = math.prod(shape)
        if per == 0 or per % 16 or count < 2:
            return [self.draw(shape) for _ in range(count)]
        block = torch.empty((len(self.generators), count, *shape))  # sample-major
        for row, g in zip(block.unbind(0), self.generators, strict=True):
            row.normal_(generator=g)
        if len(self.generators) > 1:  # one contiguous (B, *shape) tensor per draw
            block = block.transpose(0, 1).contiguous()
            return list(block.unbind(0))
        return list(block.unbind(1))  # (1, *shape) views, contiguous as they are

    def stream(self, stream: int) -> PerSampleNoise:
        """A fresh source over the same samples, independent of this one (see `stream_seeds`)."""
        return PerSampleNoise(stream_seeds(self.seeds, stream))

    def __call__(self, like: Tensor) -> Tensor:
        shape = like.shape
        if shape[0] != len(self.generators):
            raise InvalidArgumentError(
                f"noise for a batch of {shape[0]} asked of a source with "
                f"{len(self.generators)} seeds"
            )
        # is_cpu first: comparing devices costs ~10 us cache-cold, after every network call
        out = self.draw(shape[1:], None if like.is_cpu else like.device)
        return out if out.dtype == like.dtype else out.to(like.dtype)


class GeneratorNoise:
    """All samples from one torch.Generator: cheaper, but a sample's noise depends on its batch."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, like: Tensor) -> Tensor:
        out = torch.randn(like.shape, generator=self.generator, device=self.generator.device)
        return out.to(device=like.device, dtype=like.dtype)


UPFRONT_LIMIT = 1 << 20  # elements: a call's draws are made together only up to this (4 MB)


def upfront(noise: NoiseSource | None, like: Tensor, count: int) -> NoiseSource | None:
    """`noise` for a sampler that will call it `count` times, in order, with tensors shaped like
    `like` (its state x). From a PerSampleNoise on CPU, at most UPFRONT_LIMIT elements in all,
    the draws are made here, back to back: the same calls in the same order, so bitwise the
    draws made one per step, but with randn's code warm, where right after each network call one
    draw costs ~3x (batch 1). Any other source, or more elements, is returned as it is: called
    per step, as before. The returned source must be called exactly as announced."""
    if (
        not isinstance(noise, PerSampleNoise)
        or count < 2
        or not like.is_cpu
        or count * like.numel() > UPFRONT_LIMIT
    ):
        return noise
    if like.dtype == torch.float32 and like.shape[0] == len(noise.generators):
        draws = noise.draw_run(like.shape[1:], count)[::-1]
    else:  # noise(like) converts the dtype, or names the batch mismatch
        draws = [noise(like) for _ in range(count)][::-1]
    return lambda x: draws.pop()
