"""Edit inputs of a request: img2img (SDEdit, Meng et al. 2022) and training-free inpainting
(RePaint, Lugmayr et al. 2022), resolved by the one request resolver into the Plan.

Request fields (library, CLI and HTTP alike):
- `init_image`: the image to edit: PNG bytes, a base64 PNG string (a `data:image/png;base64,`
  prefix is allowed), or a uint8 tensor (C, H, W); one for all images or a list of one per image.
  Its size must be the model's image_shape (H, W); it is converted to the model's channels
  (grey "L" for C = 1, "RGB" for C = 3).
- `mask`: where to generate: white (>= 128) = generate, black = keep (the diffusers convention);
  PNG bytes, base64 PNG, or a tensor (H, W) / (1, H, W): bool or float (>= 0.5 generate) or uint8
  (>= 128 generate). Thresholded to binary. Needs `init_image`. One for all or one per image.
- `strength` in (0, 1]: how far the input is noised (`start_for_strength`); default 0.8 for
  img2img and 1.0 for inpainting (diffusers' defaults). 1 starts at sigma_max (x = init + sigma_max z).
- `resample`: RePaint's [jump_length, jump_n_sample] (inpainting only); None: no resampling.
- `init_image_sha256`, `mask_sha256`: optional, one per image; when given the inputs must hash to
  them (a replay of `Plan.params()` with the images put back checks it is the same input).

A sha256 here is over the uint8 pixels (C, H, W) row-major after decoding and channel conversion
(for the mask: the binary mask as 0/255, (1, H, W)), as the service's X-Output-SHA256, so an edit
of a previous output names it by that output's hash whatever PNG encoder wrote it.

Limits are checked before anything is decoded: an encoded input larger than
`RequestLimits.max_image_bytes` is a "too_large" problem (HTTP 413); a wrong size, format or mask
is a 422. A PNG's size is read from its header, so a decode bomb is refused before its pixels are.

Latent models: the init image is encoded by the VAE (one image per call, so an image's latents
never depend on its batch); the pixel mask goes to the latent grid by max-pooling over each latent
cell's f x f footprint (f = H / h, an integer): a latent cell is generated if any of its pixels is,
so every kept latent cell lies wholly inside the kept region. Only pixel models keep the known
region unchanged to the byte; a latent model's kept region is its VAE reconstruction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from difforge.pipeline.conditioning import FieldProblem

if TYPE_CHECKING:
    from difforge.pipeline.model import Model

DEFAULT_STRENGTH = {False: 0.8, True: 1.0}  # img2img, inpainting (diffusers' defaults)
_DATA_URL = "data:image/png;base64,"


@dataclass(frozen=True)
class EditSettings:
    """What every row of one sampler call must share (part of serving's BatchKey)."""

    inpaint: bool  # a mask is re-imposed after every step (RePaint)
    start: int  # index into the sigma grid where sampling starts (from strength)
    resample: tuple[int, int] | None = None  # RePaint (jump_length, jump_n_sample)


@dataclass(frozen=True, eq=False)
class EditRow:
    """One image's edit inputs, in pixel space (converted to the model's space at sampling)."""

    image: Tensor  # (C, H, W) float32 in [-1, 1]
    mask: Tensor | None = None  # (1, H, W) float32 in {0, 1}; 1 = generate


@dataclass(frozen=True, eq=False)
class Edit:
    """A resolved edit: its settings, one EditRow per image, and the inputs' hashes."""

    settings: EditSettings
    rows: tuple[EditRow, ...]
    strength: float = 1.0
    init_sha256: tuple[str, ...] = ()
    mask_sha256: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        """JSON parameters for provenance and the audit log (the inputs by their hashes)."""
        out: dict[str, Any] = {
            "strength": self.strength,
            "init_image_sha256": list(self.init_sha256),
        }
        if self.settings.inpaint:
            out["mask_sha256"] = list(self.mask_sha256)
        if self.settings.resample is not None:
            out["resample"] = list(self.settings.resample)
        return out

    def image_params(self, i: int) -> dict[str, Any]:
        """Image i's edit record (PNG provenance): strength and its inputs' hashes."""
        out: dict[str, Any] = {"strength": self.strength, "init_image_sha256": self.init_sha256[i]}
        if self.settings.inpaint:
            out["mask_sha256"] = self.mask_sha256[i]
        if self.settings.resample is not None:
            out["resample"] = list(self.settings.resample)
        return out


def pixels_sha256(pixels: Tensor) -> str:
    """sha256 of a uint8 tensor's bytes, row-major."""
    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()


def _problem(problems: list, loc: tuple, msg: str, kind: str = "value_error") -> None:
    problems.append(FieldProblem(loc, msg, kind))


def encoded_size(value: Any) -> int | None:
    """The PNG's size in bytes, from base64 text (a data: URL prefix allowed) without decoding it,
    or from bytes; None for anything else."""
    if isinstance(value, str):
        return len(value.removeprefix(_DATA_URL)) * 3 // 4
    return len(value) if isinstance(value, bytes | bytearray) else None


def _png_data(value: Any, loc: tuple, max_bytes: int | None, problems: list) -> bytes | None:
    """bytes or base64 text -> PNG bytes, the size limit checked before base64 is decoded."""
    size = encoded_size(value)
    if size is None:
        _problem(problems, loc, "must be a PNG: base64 text, bytes or a uint8 tensor", "type")
        return None
    text = value.removeprefix(_DATA_URL) if isinstance(value, str) else None
    if max_bytes is not None and size > max_bytes:
        msg = f"is {size} bytes; the limit is {max_bytes}"
        _problem(problems, loc, msg, "too_large")
        return None
    if text is None:
        return bytes(value)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _problem(problems, loc, "is not valid base64", "value_error")
        return None


def _decode_png(data: bytes, loc: tuple, shape: Sequence[int], mode: str, problems: list):
    """PNG bytes -> uint8 (C, H, W) in `mode`, or None; the size comes from the header first."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:  # reads the header only
            if img.size != (w, h):
                msg = f"is {img.size[0]}x{img.size[1]}; the model takes {w}x{h} (W x H)"
                _problem(problems, loc, msg, "wrong_size")
                return None
            arr = torch.frombuffer(bytearray(img.convert(mode).tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        _problem(problems, loc, "is not a readable PNG", "value_error")
        return None
    return arr.reshape(h, w, c).permute(2, 0, 1).contiguous()  # (C, H, W)


def _image(value: Any, loc: tuple, shape, max_bytes, problems) -> Tensor | None:
    """One init image -> uint8 (C, H, W), or None with a problem recorded."""
    if isinstance(value, Tensor):
        if value.dtype != torch.uint8 or tuple(value.shape) != tuple(shape):
            msg = f"a tensor init image must be uint8 of shape {tuple(shape)}, got "
            _problem(problems, loc, msg + f"{value.dtype} {tuple(value.shape)}", "type")
            return None
        return value.contiguous()
    data = _png_data(value, loc, max_bytes, problems)
    if data is None:
        return None
    return _decode_png(data, loc, shape, "L" if shape[0] == 1 else "RGB", problems)


def _mask(value: Any, loc: tuple, shape, max_bytes, problems) -> Tensor | None:
    """One mask -> uint8 (1, H, W) of 0 (keep) / 255 (generate), or None with a problem."""
    _, h, w = shape
    if isinstance(value, Tensor):
        m = value.reshape(1, *value.shape) if value.ndim == 2 else value
        if tuple(m.shape) != (1, h, w):
            msg = f"a tensor mask must be (H, W) or (1, H, W) = (1, {h}, {w}), got "
            _problem(problems, loc, msg + str(tuple(value.shape)), "wrong_size")
            return None
        if m.dtype == torch.uint8:
            return torch.where(m >= 128, 255, 0).to(torch.uint8)
        m = m.float()
        if not torch.isfinite(m).all():
            _problem(problems, loc, "must be finite")
            return None
        return torch.where(m >= 0.5, 255, 0).to(torch.uint8)
    data = _png_data(value, loc, max_bytes, problems)
    grey = None if data is None else _decode_png(data, loc, (1, h, w), "L", problems)
    return None if grey is None else torch.where(grey >= 128, 255, 0).to(torch.uint8)


def per_image_counts(req) -> list[int]:
    """Lengths of the request's per-image edit inputs (lists, a batched init tensor), for n."""
    out = [len(v) for v in (req.init_image, req.mask) if isinstance(v, list)]
    if isinstance(req.init_image, Tensor) and req.init_image.ndim == 4:
        out.append(req.init_image.shape[0])
    return out


def _per_image(value: Any, n: int, name: str, problems: list) -> list[tuple[Any, tuple]] | None:
    """One value for all images or a list of one per image -> n (value, loc) pairs; a batched
    init tensor (n, C, H, W) is one per image."""
    if name == "init_image" and isinstance(value, Tensor) and value.ndim == 4:
        value = list(value)
    if not isinstance(value, list):
        return [(value, (name,))] * n
    if len(value) != n:
        _problem(problems, (name,), f"has {len(value)} entries for n = {n}")
        return None
    return [(v, (name, i)) for i, v in enumerate(value)]


def _decode_all(req, model: Model, n: int, max_bytes: int | None, problems: list):
    """(uint8 images (n of (C, H, W)), binary masks (n of (1, H, W)) or None), or None."""
    shape = model.image_shape
    images = _per_image(req.init_image, n, "init_image", problems)
    masks = None if req.mask is None else _per_image(req.mask, n, "mask", problems)
    if images is None or (req.mask is not None and masks is None):
        return None
    cache: dict[int, Tensor | None] = {}  # one decode per distinct input object

    def once(fn, value, loc):
        if id(value) not in cache:
            cache[id(value)] = fn(value, loc, shape, max_bytes, problems)
        return cache[id(value)]

    pixels = [once(_image, v, loc) for v, loc in images]
    binary = None if masks is None else [once(_mask, v, loc) for v, loc in masks]
    if any(p is None for p in pixels) or (binary is not None and any(m is None for m in binary)):
        return None
    return pixels, binary


def _check_hashes(given, hashes: list[str], name: str, problems: list) -> None:
    if given is None:
        return
    if len(given) != len(hashes):
        _problem(problems, (name,), f"has {len(given)} entries for n = {len(hashes)}")
        return
    for i, (want, got) in enumerate(zip(given, hashes, strict=True)):
        if want != got:
            _problem(problems, (name, i), f"the input hashes to {got}, not {want}", "mismatch")


def _settings(req, steps: int, inpaint: bool, problems: list) -> tuple[float, EditSettings]:
    from difforge.samplers import start_for_strength

    strength = DEFAULT_STRENGTH[inpaint] if req.strength is None else float(req.strength)
    start = 0
    if not (math.isfinite(strength) and 0 < strength <= 1):
        _problem(problems, ("strength",), f"must be in (0, 1], got {strength}", "range")
    elif steps >= 1:
        start = start_for_strength(steps, strength)
    resample = None if req.resample is None else tuple(req.resample)
    if resample is not None:
        if not inpaint:
            _problem(problems, ("resample",), "RePaint resampling needs a mask", "conflict")
        elif any(v < 1 or v > steps for v in resample):
            msg = f"jump_length and jump_n_sample must be in [1, steps = {steps}]"
            _problem(problems, ("resample",), msg, "range")
    return strength, EditSettings(inpaint, start, resample)


def resolve_edit(
    model: Model, req, n: int, steps: int, max_bytes: int | None, problems: list
) -> Edit | None:
    """The request's edit fields -> an Edit (None: plain generation); problems are appended."""
    if req.init_image is None:
        for name in ("mask", "strength", "resample", "init_image_sha256", "mask_sha256"):
            if getattr(req, name) is not None:
                _problem(problems, (name,), "needs init_image (the image to edit)", "conflict")
        return None
    inpaint = req.mask is not None
    if req.mask_sha256 is not None and not inpaint:
        _problem(problems, ("mask_sha256",), "given without a mask", "conflict")
    strength, settings = _settings(req, steps, inpaint, problems)
    decoded = _decode_all(req, model, n, max_bytes, problems)
    if decoded is None:
        return None
    pixels, binary = decoded
    init_sha = [pixels_sha256(p) for p in pixels]
    mask_sha = [] if binary is None else [pixels_sha256(m) for m in binary]
    _check_hashes(req.init_image_sha256, init_sha, "init_image_sha256", problems)
    if inpaint:
        _check_hashes(req.mask_sha256, mask_sha, "mask_sha256", problems)
    rows = tuple(
        EditRow(
            image=p.float() / 127.5 - 1,  # uint8 -> [-1, 1]; to_uint8 inverts it exactly
            mask=None if binary is None else (binary[i] > 0).float(),
        )
        for i, p in enumerate(pixels)
    )
    return Edit(settings, rows, strength, tuple(init_sha), tuple(mask_sha))


def pad_row(model: Model, settings: EditSettings) -> EditRow:
    """A filler row for fixed-shape calls: a zero image, generated everywhere."""
    c, h, w = model.image_shape
    mask = torch.ones(1, h, w) if settings.inpaint else None
    return EditRow(torch.zeros(c, h, w), mask)


def latent_mask(mask: Tensor, latent_hw: Sequence[int]) -> Tensor:
    """A pixel mask (B, 1, H, W) -> the latent grid (B, 1, h, w): max over each f x f cell."""
    (ph, pw), (h, w) = mask.shape[-2:], tuple(latent_hw)
    if (h, w) == (ph, pw):
        return mask
    if ph % h or pw % w or ph // h != pw // w:
        raise ValueError(f"mask {ph}x{pw} does not tile the latent grid {h}x{w}")
    return F.max_pool2d(mask, ph // h)


def sample_arguments(model: Model, edit: Edit, seeds: Sequence[int]) -> dict[str, Any]:
    """The `samplers.sample` arguments of an edit: init (model space), start, step_hook, resample.

    The inpainting hook draws its noise from each sample's stream 1, so re-imposing the known
    region never shifts the sampler's own draws and depends on the sample's seed only.
    """
    from difforge.core.editing import Inpaint
    from difforge.samplers import PerSampleNoise

    pixels = torch.stack([r.image for r in edit.rows])  # (B, C, H, W)
    init = pixels if model.vae is None else torch.cat([model.encode(p[None]) for p in pixels])
    out: dict[str, Any] = {"init": init, "start": edit.settings.start}
    if edit.settings.inpaint:
        mask = latent_mask(torch.stack([r.mask for r in edit.rows]), init.shape[-2:])
        out["step_hook"] = Inpaint(init, mask, PerSampleNoise(seeds).stream(1))
    if edit.settings.resample is not None:
        out["resample"] = edit.settings.resample
    return out
