"""A 1-D U-Net denoiser for series (B, C, T): the 2-D U-Net's blocks with convolutions over time.

forward(x, c_noise, cond) -> (B, out_channels, T). The same stages as `difforge.nets.unet.UNet`
(FiLM/AdaGN residual blocks, self-attention over the T positions at chosen lengths, a learned null
class for classifier-free guidance, optional cross-attention), built from the shared layers in
`difforge.nets.layers` with `dims=1`. Architecture only: what c_noise means and what the output
predicts is decided by the denoiser adapter that wraps the net.

cond is None or a mapping with optional
  "labels":  (B,) int64 in [0, num_classes]; index num_classes is the learned null class.
  "context": (B, L, context_dim) float for cross-attention; missing means no cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difforge.nets.unet import LevelsConfig, UNet


@dataclass(frozen=True)
class UNet1DConfig(LevelsConfig):
    """Hyperparameters of `UNet1D`; stored as JSON next to the weights (`to_dict`/`from_dict`)."""

    SIZE_FIELD: ClassVar[str] = "length"

    in_channels: int = 1  # channels C of the input series x (B, C, T)
    out_channels: int = 1  # channels of the prediction (usually = in_channels)
    length: int = 128  # T; must be divisible by 2 ** (len(channel_mults) - 1)
    base_channels: int = 32  # channels at full length
    # channels of level i = base_channels * channel_mults[i]; T halves between levels
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    # lengths (T at a level) where self-attention over time runs, the middle block included
    attention_resolutions: tuple[int, ...] = (32,)
    head_dim: int = 32  # channels per attention head; heads = channels // head_dim
    dropout: float = 0.0  # dropout probability inside residual blocks
    # classes 0..num_classes-1 plus the null class num_classes; 0 = unconditional (labels ignored)
    num_classes: int = 0
    context_dim: int | None = None  # cross-attention context width; None = no cross-attention
    norm_groups: int = 8  # GroupNorm groups; must divide every channel count
    emb_mult: int = 4  # noise/class embedding width = base_channels * emb_mult (ADM uses 4)


class UNet1D(UNet):
    """`UNet` over time: Conv1d blocks, attention over T, class and text conditioning.

    Args:
        config: the architecture (see `UNet1DConfig`); x must have shape (B, in_channels, length).
    """

    kind = "unet1d"
    dims: ClassVar[int] = 1

    def __init__(self, config: UNet1DConfig):
        super().__init__(config)  # type: ignore[arg-type]  # same fields, T in place of H = W
