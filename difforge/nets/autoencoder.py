"""A KL-regularised convolutional autoencoder (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3 and App. G): images -> latents -> images.

encode(x) -> (mean, logvar) of q(z | x), each (B, latent_channels, H / f, W / f) with
f = 2 ** (len(channel_mults) - 1); decode(z) -> (B, in_channels, H, W). Architecture only: the
latent scaling factor and the KL weight live in the pipeline and the training objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError
from difforge.nets.jsonconfig import JsonConfig


@dataclass(frozen=True)
class AutoencoderConfig(JsonConfig):
    """Hyperparameters of `Autoencoder`; stored as JSON next to the weights."""

    in_channels: int = 1  # image channels
    image_size: int = 64  # H = W; divisible by the downsampling factor
    latent_channels: int = 4  # C of the latents
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)  # f = 2 ** (levels - 1): (1, 2, 2) gives f = 4
    norm_groups: int = 8
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution

    def __post_init__(self) -> None:
        for name in ("channel_mults", "logvar_clamp"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("in_channels", "image_size", "latent_channels", "base_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.channel_mults or any(int(m) < 1 for m in self.channel_mults):
            raise InvalidArgumentError(f"channel_mults must be positive, got {self.channel_mults}")
        if self.image_size % self.factor:
            raise InvalidArgumentError(
                f"image_size {self.image_size} is not divisible by the factor {self.factor}"
            )
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise InvalidArgumentError(
                    f"norm_groups {self.norm_groups} must divide {self.base_channels * m}"
                )

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.factor
        return (self.latent_channels, s, s)


class _Res(nn.Module):
    """GN-SiLU-conv residual block without a noise embedding (the autoencoder sees no sigma)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, in_ch),
            nn.SiLU(),
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.GroupNorm(groups, out_ch),
            nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class Autoencoder(nn.Module):
    """Encoder and decoder of a KL autoencoder; `forward` is the deterministic round trip."""

    kind = "autoencoder"

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        chans = [c.base_channels * m for m in c.channel_mults]
        enc: list[nn.Module] = [nn.Conv2d(c.in_channels, chans[0], 3, padding=1)]
        for i, ch in enumerate(chans):
            enc.append(_Res(chans[max(i - 1, 0)], ch, c.norm_groups))
            if i < len(chans) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # H -> H / 2
        enc += [nn.GroupNorm(c.norm_groups, chans[-1]), nn.SiLU()]
        enc.append(nn.Conv2d(chans[-1], 2 * c.latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c.latent_channels, chans[-1], 3, padding=1)]
        rev = chans[::-1]
        for i, ch in enumerate(rev):
            dec.append(_Res(rev[max(i - 1, 0)], ch, c.norm_groups))
            if i < len(rev) - 1:
                dec += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(ch, ch, 3, padding=1),
                ]
        dec += [nn.GroupNorm(c.norm_groups, rev[-1]), nn.SiLU()]
        dec.append(nn.Conv2d(rev[-1], c.in_channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of q(z | x), each (B, latent_channels, H / f, W / f)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*self.config.logvar_clamp)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_channels, h, w) -> (B, in_channels, h * f, w * f) in data space."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)[0])


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over latent dims (LDM, App. G)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str = "l1") -> Tensor:
    """Per-sample mean L1 or L2 reconstruction error."""
    err = (
        F.l1_loss(x_hat, x, reduction="none")
        if kind == "l1"
        else F.mse_loss(x_hat, x, reduction="none")
    )
    return err.flatten(1).mean(1)
