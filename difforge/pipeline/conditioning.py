"""The conditioning spec: the one place that knows what a model is conditioned on.

A spec lists keys. Each key says how a request value becomes one per-image tensor, what its null
value is (the unconditional input of classifier-free guidance, Ho & Salimans 2022), how often
training replaces it by that null (their Alg. 1, "p_uncond"), and where training reads it from
the data set. The training loop, `Model.sample`, the request resolver, the evaluation runner and the
serving batcher all go through a spec; none of them knows the names of the keys.

A *row* is the resolved conditioning of one image: {key: tensor without a batch dimension}.
`collate` stacks rows into the batched `cond` mapping a denoiser takes; rows whose signatures
(key, dtype, shape) agree can share a sampler call.

Kinds today: "class" (an integer class with a learned null class), "slots" (a class per
slot with an empty token, e.g. the quadrants of a scene), "text" (a prompt as
token ids; the null value is the empty prompt; a key may also take a negative prompt, which
replaces the null value in the unconditional branch of guidance), "low_res" (a
low-resolution image for super-resolution, with conditioning augmentation) and "masked_image"
(the mask and the known pixels of an inpainting request as extra input channels, filled from the
request's init image and mask by `fill_from_edit`). New kinds (attribute vectors, ...) are new
members of `CondKey`, not edits elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from difforge.core.errors import InvalidArgumentError
from difforge.data.tokenizer import PromptError, check_text, tokenizer_from_json

PLANNED = "planned"  # a planned slots key's value: the layout stage draws it from the prompt
Row = dict[str, Tensor]  # one image's conditioning: {key: tensor, no batch dimension}
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]  # (key, dtype, shape) per key, sorted


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FieldProblem(InvalidArgumentError):
    """A request value is invalid; `loc` is the field path, e.g. ("labels", 2)."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, kind: str = "value_error"):
        self.loc, self.msg, self.kind = loc, msg, kind
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")


class ClassKey(_Frozen):
    """An integer class per image, with a learned null class for guidance.

    Request value: one int (all images), a list of one per image (None entries: the null class,
    i.e. unconditional), or absent: the classes cycle 0, 1, ..., num_classes - 1 over the images.
    """

    kind: Literal["class"] = "class"
    name: str = "labels"  # request field and the network's cond key
    num_classes: int = Field(ge=1)
    class_names: tuple[str, ...] = ()
    dropout: float = Field(0.1, ge=0, le=1)  # training: P(value -> null)
    source: str = "labels"  # the data set's field training reads

    @model_validator(mode="after")
    def _names(self) -> ClassKey:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries for {self.num_classes} classes"
            )
        return self

    @property
    def null(self) -> int:
        return self.num_classes  # the extra embedding row the net learns as "no class"

    def null_row(self) -> Tensor:
        return torch.tensor(self.null, dtype=torch.int64)

    def resolve(self, value: Any, n: int) -> list[Tensor]:
        """The request value as n per-image tensors, or FieldProblem."""
        if value is None:
            return [torch.tensor(i % self.num_classes, dtype=torch.int64) for i in range(n)]
        values = [value] if _is_int(value) else value
        if not isinstance(values, list | tuple) or not values:
            raise FieldProblem((self.name,), "must be a class or a non-empty list of classes")
        if len(values) not in (1, n):
            raise FieldProblem((self.name,), f"has {len(values)} entries for n = {n}", "length")
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(self.null_row())
            elif _is_int(v) and 0 <= v < self.num_classes:
                out.append(torch.tensor(v, dtype=torch.int64))
            else:
                where = (self.name,) if _is_int(value) else (self.name, i)
                raise FieldProblem(
                    where, f"must be an integer in [0, {self.num_classes - 1}], got {v!r}", "range"
                )
        return out * (n if len(out) == 1 else 1)

    def images(self, value: Any) -> int | None:
        """How many images a request value gives one entry for (None: it is for all images)."""
        return len(value) if isinstance(value, list) else None

    def describe_row(self, row: Tensor) -> int | None:
        """The JSON value a row came from (the null class is None)."""
        v = int(row)
        return None if v == self.null else v

    def caption(self, row: Tensor) -> str:
        v = self.describe_row(row)
        if v is None:
            return "-"
        return self.class_names[v] if v < len(self.class_names) else str(v)

    def from_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch[self.source]

    def drop(self, values: Tensor, generator: torch.Generator) -> Tensor:
        """Replace each value by the null class with probability `dropout` (Ho & Salimans, Alg. 1)."""
        drop = torch.rand(values.shape[0], generator=generator) < self.dropout
        return torch.where(drop, torch.full_like(values, self.null), values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SlotsKey(_Frozen):
    """A fixed-length vector of classes, one per slot (e.g. the quadrants of a scene).

    Each slot holds a class in [0, num_classes) or the `empty` token (num_classes); the null
    value for guidance is a separate token (num_classes + 1) in every slot.
    Request value for one image: a list of num_slots entries (int class, or None / "_" for an
    empty slot), or a string such as "_6/3_" (row by row, "_" empty, "/" and spaces ignored).
    A list of such values gives one per image (a None entry: the null, i.e. unconditional).
    Absent: image i gets slots ((i + q) % num_classes for q in 0..num_slots-1), or, for a
    `planned` key, the "planned" row: the pipeline's layout stage (difforge.pipeline.layout)
    draws the slots from the prompt per image, from that image's seed. "planned" is also a value.
    """

    kind: Literal["slots"] = "slots"
    name: str = "slots"
    num_slots: int = Field(4, ge=1)
    num_classes: int = Field(10, ge=1)
    dropout: float = Field(0.1, ge=0, le=1)  # training: P(whole vector -> null)
    source: str = "slots"
    planned: bool = False  # absent value: planned from the prompt (a "layout" component)

    @property
    def empty(self) -> int:
        return self.num_classes

    @property
    def null(self) -> int:
        return self.num_classes + 1

    @property
    def plan(self) -> int:
        """The token of a slot the layout stage fills (never reaches a network)."""
        return self.num_classes + 2

    def null_row(self) -> Tensor:
        return torch.full((self.num_slots,), self.null, dtype=torch.int64)

    def plan_row(self) -> Tensor:
        return torch.full((self.num_slots,), self.plan, dtype=torch.int64)

    def _one(self, value: Any, where: tuple[str | int, ...]) -> Tensor:
        if isinstance(value, str) and value == PLANNED:
            if not self.planned:
                raise FieldProblem(where, "this model has no layout stage: give the slots", "range")
            return self.plan_row()
        if isinstance(value, str):
            value = [None if ch == "_" else ch for ch in value if ch not in "/ "]
            value = [int(v) if v is not None and v.isdigit() else v for v in value]
        if not isinstance(value, list | tuple) or len(value) != self.num_slots:
            raise FieldProblem(where, f"must hold {self.num_slots} slots, got {value!r}", "length")
        out = []
        for v in value:
            if v is None or v == "_":
                out.append(self.empty)
            elif _is_int(v) and 0 <= v < self.num_classes:
                out.append(v)
            else:
                msg = f"slots must be classes in [0, {self.num_classes - 1}] or empty, got {v!r}"
                raise FieldProblem(where, msg, "range")
        return torch.tensor(out, dtype=torch.int64)

    def _single(self, value: Any) -> bool:
        """Whether `value` is one image's slots (rather than a list of one value per image)."""
        if isinstance(value, str):
            return True
        return (
            isinstance(value, list | tuple)
            and len(value) == self.num_slots
            and not any(isinstance(v, list | tuple | str) and v != "_" for v in value)
            and not all(v is None for v in value)
        )

    def images(self, value: Any) -> int | None:
        """How many images a request value gives one entry for (None: it is for all images)."""
        return None if value is None or self._single(value) else len(value)

    def resolve(self, value: Any, n: int) -> list[Tensor]:
        """The request value as n per-image (num_slots,) tensors, or FieldProblem."""
        if value is None and self.planned:
            return [self.plan_row()] * n
        if value is None:
            return [
                torch.tensor([(i + q) % self.num_classes for q in range(self.num_slots)])
                for i in range(n)
            ]
        if self._single(value):
            return [self._one(value, (self.name,))] * n
        if not isinstance(value, list | tuple) or not value:
            raise FieldProblem((self.name,), "must be a slot list or a list of them")
        if len(value) not in (1, n):
            raise FieldProblem((self.name,), f"has {len(value)} entries for n = {n}", "length")
        out = [
            self.null_row() if v is None else self._one(v, (self.name, i))
            for i, v in enumerate(value)
        ]
        return out * (n if len(out) == 1 else 1)

    def describe_row(self, row: Tensor) -> list[int | None] | str | None:
        """A row as JSON: a list of classes with None for empty slots; None for the null row;
        "planned" for a row the layout stage fills."""
        if bool((row == self.null).all()):
            return None
        if bool((row == self.plan).all()):
            return PLANNED
        return [None if int(v) == self.empty else int(v) for v in row]

    def caption(self, row: Tensor) -> str:
        v = self.describe_row(row)
        if v is None or v == PLANNED:
            return v or "-"
        chars = ["_" if c is None else str(c) for c in v]
        half = (len(chars) + 1) // 2 if self.num_slots == 4 else len(chars)
        return "".join(chars[:half]) + ("/" + "".join(chars[half:]) if half < len(chars) else "")

    def from_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch[self.source]

    def drop(self, values: Tensor, generator: torch.Generator) -> Tensor:
        """Replace each vector by the null vector with probability `dropout` (Ho & Salimans, Alg. 1)."""
        drop = torch.rand(values.shape[0], generator=generator) < self.dropout  # (B,)
        return torch.where(drop[:, None], torch.full_like(values, self.null), values)


class TextKey(_Frozen):
    """A text prompt per image, as token ids (int64 (max_tokens,), [CLS] first, [PAD] after).

    Request value: one prompt (all images), a list of one per image (None or "": the null prompt,
    i.e. unconditional), or absent: the images cycle through `examples` (an error if there are
    none). Rules for the text itself (unknown words -> [UNK], empty -> null, too many words or
    control characters or non-UTF-8 -> an error) are difforge.data.tokenizer's.

    `negative` names the request field of the negative prompt: guidance's unconditional branch
    uses it instead of the null prompt, per image (same value forms; absent: the null prompt).
    The tokenizer (a `tokenizers` JSON) is part of the key, so it is hashed with the pipeline.
    """

    kind: Literal["text"] = "text"
    name: str = "prompt"  # request field and the network's cond key
    negative: str | None = "negative_prompt"  # request field of the negative prompt
    tokenizer: str = Field(repr=False)  # `tokenizers` JSON, trained on the caption corpus
    max_tokens: int = Field(16, ge=2)  # ids per prompt, [CLS] included
    max_chars: int = Field(256, ge=1)  # longer text is refused before tokenising
    examples: tuple[str, ...] = ()  # default prompts, cycled like ClassKey's classes
    dropout: float = Field(0.1, ge=0, le=1)  # training: P(prompt -> null)
    source: str = "prompt"  # the data set's field of token ids

    def _encode(self, text: Any, loc: tuple[str | int, ...]) -> Tensor:
        try:
            check_text(text, self.max_chars)
            ids = tokenizer_from_json(self.tokenizer).encode(text, self.max_tokens)
        except PromptError as e:
            raise FieldProblem(loc, str(e), "text") from None
        return torch.tensor(ids, dtype=torch.int64)

    def null_row(self) -> Tensor:
        return self._encode("", (self.name,))

    def resolve(self, value: Any, n: int, field: str | None = None) -> list[Tensor]:
        """The request value as n per-image id tensors, or FieldProblem (`field`: its name)."""
        field = field or self.name
        if value is None:
            if field != self.name:
                return [self.null_row()] * n
            if not self.examples:
                raise FieldProblem((field,), "is required (this model has no example prompts)")
            value = [self.examples[i % len(self.examples)] for i in range(n)]
        single = not isinstance(value, list | tuple)
        values = [value] if single else list(value)
        if not values:
            raise FieldProblem((field,), "must be a prompt or a non-empty list of prompts")
        if len(values) not in (1, n):
            raise FieldProblem((field,), f"has {len(values)} entries for n = {n}", "length")
        out = [
            self.null_row() if v is None else self._encode(v, (field,) if single else (field, i))
            for i, v in enumerate(values)
        ]
        return out * (n if len(out) == 1 else 1)

    def describe_row(self, row: Tensor) -> str:
        """The prompt as the model read it: normalised words, unknown ones as [UNK] ("": null).

        Resolving this text again gives the same ids, so a replay reproduces the row."""
        return tokenizer_from_json(self.tokenizer).decode(row.tolist())

    def caption(self, row: Tensor) -> str:
        return self.describe_row(row) or "-"

    def from_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch[self.source]  # (B, max_tokens)

    def drop(self, values: Tensor, generator: torch.Generator) -> Tensor:
        """Replace each prompt by the null prompt with probability `dropout` (Ho & Salimans, Alg. 1)."""
        drop = torch.rand(values.shape[0], generator=generator) < self.dropout  # (B,)
        return torch.where(drop[:, None], self.null_row()[None], values)  # (B, max_tokens)


class LowResKey(_Frozen):
    """A low-resolution image per image: the input of a super-resolution model (Ho et al. 2022,
    "Cascaded Diffusion Models"), with Gaussian conditioning augmentation (their Sec. 4.2).

    Request value: a uint8 tensor (C, size, size) or PNG bytes / base64 PNG text (one for all
    images), a batched uint8 tensor (n, C, size, size), or a list of one per image (None: the null,
    no image). No default: it is required. Limits (encoded bytes, size) are checked before
    decoding (difforge.pipeline.editing's PNG plumbing).

    A row is float32 (C + 1, size, size): the clean image in [-1, 1] and a constant channel with
    the augmentation level s (-1 for the null row). Noise is added when the image is used, never
    in the row: training draws s ~ U[0, max_level] per image (`drop`), sampling uses the fixed
    `level` with noise from each sample's own stream (`augment`): z = x_low + s * eps.
    """

    kind: Literal["low_res"] = "low_res"
    name: str = "low_res"  # request field and the network's cond key
    channels: int = Field(1, ge=1)
    size: int = Field(ge=1)  # H = W of the low-resolution image
    level: float = Field(0.1, ge=0)  # sampling: the augmentation std in data units ([-1, 1])
    max_level: float = Field(0.5, ge=0)  # training: s ~ U[0, max_level]
    dropout: float = Field(0.1, ge=0, le=1)  # training: P(image -> null)
    source: str = "low_res"  # the data set's field of uint8 low-res images

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def null_row(self) -> Tensor:
        row = torch.zeros(self.channels + 1, self.size, self.size)
        row[-1] = -1.0  # no image
        return row

    def row(self, pixels: Tensor) -> Tensor:
        """uint8 (C, size, size) -> the row (C + 1, size, size) at the sampling level."""
        level = torch.full((1, self.size, self.size), float(self.level))
        return torch.cat([pixels.float() / 127.5 - 1, level])

    def check_size(self, value: Any, max_bytes: int | None, problems: list) -> None:
        """Encoded inputs over `max_bytes` -> "too_large" problems (before anything is decoded)."""
        from difforge.pipeline.editing import encoded_size

        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            size = encoded_size(v) or 0
            if max_bytes is not None and size > max_bytes:
                loc = (self.name, i) if isinstance(value, list) else (self.name,)
                msg = f"is {size} bytes; the limit is {max_bytes}"
                problems.append(FieldProblem(loc, msg, "too_large"))

    def images(self, value: Any) -> int | None:
        if isinstance(value, Tensor) and value.ndim == 4:
            return value.shape[0]
        return len(value) if isinstance(value, list) else None

    def resolve(self, value: Any, n: int) -> list[Tensor]:
        """The request value as n rows, or FieldProblem (the first bad image)."""
        from difforge.pipeline.editing import _image

        if value is None:  # no image: an unconditional draw (what dropout trained)
            return [self.null_row()] * n
        if isinstance(value, Tensor) and value.ndim == 4:
            value = list(value)
        values = value if isinstance(value, list) else [value]
        if not values or len(values) not in (1, n):
            raise FieldProblem((self.name,), f"has {len(values)} entries for n = {n}", "length")
        out, problems = [], []
        for i, v in enumerate(values):
            loc = (self.name, i) if isinstance(value, list) else (self.name,)
            pixels = None if v is None else _image(v, loc, self.shape, None, problems)
            if problems:
                raise problems[0]
            out.append(self.null_row() if v is None else self.row(pixels))
        return out * (n if len(out) == 1 else 1)

    def pixels(self, row: Tensor) -> Tensor:
        """A row's clean image as uint8 (C, size, size) (exact: rows hold p / 127.5 - 1)."""
        return ((row[:-1] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def describe_row(self, row: Tensor) -> dict[str, Any] | None:
        """The input by the sha256 of its uint8 pixels, and its augmentation level (None: the
        null row)."""
        from difforge.pipeline.editing import pixels_sha256

        level = round(float(row[-1, 0, 0]), 6)  # float32 in the row
        return None if level < 0 else {"sha256": pixels_sha256(self.pixels(row)), "level": level}

    def caption(self, row: Tensor) -> str:
        d = self.describe_row(row)
        return "-" if d is None else f"x{d['sha256'][:8]}"

    def from_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        low = batch[self.source].float() / 127.5 - 1  # (B, C, h, w)
        return torch.cat([low, torch.zeros_like(low[:, :1])], dim=1)  # level 0: clean

    def drop(self, values: Tensor, generator: torch.Generator) -> Tensor:
        """Training: augment each image at s ~ U[0, max_level] (Ho et al. 2022, Sec. 4.2), then
        replace it by the null with probability `dropout` (Ho & Salimans, Alg. 1)."""
        b, c = values.shape[0], self.channels
        s = torch.rand(b, generator=generator) * self.max_level  # (B,)
        eps = torch.randn(values[:, :c].shape, generator=generator)  # (B, C, h, w)
        image = values[:, :c] + s[:, None, None, None] * eps
        out = torch.cat([image, s[:, None, None, None].expand_as(values[:, c:])], dim=1)
        drop = torch.rand(b, generator=generator) < self.dropout  # (B,)
        return torch.where(drop[:, None, None, None], self.null_row()[None], out)

    def augment(self, values: Tensor, noise) -> Tensor:
        """Sampling: z = x_low + s * eps for every non-null row, eps from `noise` (per sample)."""
        c = self.channels
        s = values[:, c, 0, 0].clamp(min=0)  # (B,); the null row (-1) is left as it is
        image = values[:, :c] + s[:, None, None, None] * noise(values[:, :c])
        return torch.cat([image, values[:, c:]], dim=1)


MaskShape = Literal["half", "rectangle", "strokes"]


class MaskedImageKey(_Frozen):
    """What an inpainting request knows, as extra input channels of the net (the recipe of
    Rombach et al. 2022's inpainting model): float32 (1 + C, H, W), channel 0 the mask (1 =
    generate, 0 = keep), then the image in [-1, 1] where it is kept and 0 where it is generated.

    Request value: none of its own. `fill_from_edit` builds the row from the request's
    `init_image` and `mask` (difforge.pipeline.editing); absent, the row is the null value:
    nothing known (mask 1, image 0), i.e. plain generation. The row stays in guidance's
    unconditional branch (guidance then contrasts the other keys, as the known pixels are the
    same in both). Pixel models only: a latent model would need the mask on the latent grid
    (editing.latent_mask) and the encoded masked image.

    Training: `drop` draws one mask per image from `masks` (a random half, a rectangle of a
    quarter to three quarters of each side, or 1-4 brush strokes of 1-3 px radius) with the
    loop's generator, and makes `dropout` of the rows null.
    """

    kind: Literal["masked_image"] = "masked_image"
    name: str = "inpaint"  # the network's cond key (no request field: it comes from an edit)
    image_shape: tuple[int, int, int]  # (C, H, W) of the images
    masks: tuple[MaskShape, ...] = ("half", "rectangle", "strokes")
    dropout: float = Field(0.1, ge=0, le=1)  # training: P(row -> null, nothing known)
    source: str = "images"  # training: the batch's clean images in [-1, 1]

    @property
    def channels(self) -> int:
        return 1 + self.image_shape[0]

    def null_row(self) -> Tensor:
        _, h, w = self.image_shape
        return torch.cat([torch.ones(1, h, w), torch.zeros(self.image_shape)])

    def row(self, image: Tensor, mask: Tensor) -> Tensor:
        """One image (C, H, W) in [-1, 1] and its mask (1, H, W) in {0, 1} -> (1 + C, H, W)."""
        return torch.cat([mask, image * (1 - mask)]).float()

    def resolve(self, value: Any, n: int) -> list[Tensor]:
        if value is not None and value != "init_image*mask":
            raise FieldProblem((self.name,), "is set from init_image and mask, not directly")
        return [self.null_row()] * n

    def images(self, value: Any) -> int | None:
        return None

    def describe_row(self, row: Tensor) -> str | None:
        return None if bool((row[0] == 1).all()) else "init_image*mask"

    def caption(self, row: Tensor) -> str:
        return "" if self.describe_row(row) is None else "(inpainted)"

    def from_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch[self.source]  # (B, C, H, W) in [-1, 1]

    def drop(self, values: Tensor, generator: torch.Generator) -> Tensor:
        """Training rows of images (B, C, H, W): a random mask each, `dropout` of them null."""
        masks = torch.stack(
            [random_mask(self.masks, self.image_shape[1:], generator) for _ in values]
        )
        rows = torch.cat([masks, values * (1 - masks)], dim=1)  # (B, 1 + C, H, W)
        drop = torch.rand(values.shape[0], generator=generator) < self.dropout  # (B,)
        return torch.where(drop[:, None, None, None], self.null_row()[None], rows)


def random_mask(shapes: Sequence[str], hw: Sequence[int], g: torch.Generator) -> Tensor:
    """One training mask (1, H, W) in {0, 1} (1 = generate) of a shape drawn from `shapes`."""
    h, w = hw
    shape = shapes[int(torch.randint(len(shapes), (1,), generator=g))]
    m = torch.zeros(1, h, w)
    if shape == "half":
        side = int(torch.randint(4, (1,), generator=g))  # lower, upper, left, right
        (m[:, h // 2 :], m[:, : h // 2], m[..., : w // 2], m[..., w // 2 :])[side].fill_(1)
    elif shape == "rectangle":
        rh, rw = (int(torch.randint(s // 4, 3 * s // 4 + 1, (1,), generator=g)) for s in (h, w))
        y, x = (
            int(torch.randint(h - rh + 1, (1,), generator=g)),
            int(torch.randint(w - rw + 1, (1,), generator=g)),
        )
        m[:, y : y + rh, x : x + rw] = 1
    else:  # brush strokes: random walks of a disc
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            r = 1 + 2 * float(torch.rand(1, generator=g))
            p = torch.rand(2, generator=g) * torch.tensor([h, w])
            step = (torch.rand(2, generator=g) - 0.5) * 4
            for _ in range(int(torch.randint(4, 12, (1,), generator=g))):
                m[0][(yy - p[0]) ** 2 + (xx - p[1]) ** 2 <= r * r] = 1
                step = step + (torch.rand(2, generator=g) - 0.5) * 2
                p = p + step
    return m


CondKey = Annotated[
    ClassKey | SlotsKey | TextKey | LowResKey | MaskedImageKey, Field(discriminator="kind")
]


class ConditioningSpec(_Frozen):
    """The keys a model is conditioned on; empty for an unconditional model."""

    keys: tuple[CondKey, ...] = ()
    # training: P(every key -> its null together), on top of each key's own dropout, so that
    # guidance's all-null branch is trained as often with several keys as with one
    dropout_all: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _unique(self) -> ConditioningSpec:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError(f"conditioning key names must be unique, got {names}")
        return self

    @classmethod
    def for_classes(
        cls, num_classes: int, class_names: Sequence[str] = (), dropout: float = 0.1
    ) -> ConditioningSpec:
        """The spec of a wave-1 class-conditional model (`num_classes` 0: unconditional)."""
        if not num_classes:
            return cls()
        key = ClassKey(num_classes=num_classes, class_names=tuple(class_names), dropout=dropout)
        return cls(keys=(key,))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    @property
    def guidable(self) -> bool:
        """Classifier-free guidance needs a null value for some key."""
        return bool(self.keys)

    def key(self, name: str) -> CondKey:
        for k in self.keys:
            if k.name == name:
                return k
        raise InvalidArgumentError(f"no conditioning key {name!r}; keys: {list(self.names)}")

    def class_key(self) -> ClassKey | None:
        """The class key, for evaluation by a classifier (None when there is none)."""
        return next((k for k in self.keys if k.kind == "class"), None)

    def resolve(self, values: Mapping[str, Any], n: int) -> list[Row]:
        """Request values {key: value} -> n rows; raises the first FieldProblem."""
        problems: list[FieldProblem] = []
        rows = self.resolve_all(values, n, problems)
        if problems:
            raise problems[0]
        return rows

    def resolve_all(self, values: Mapping[str, Any], n: int, problems: list) -> list[Row]:
        """Request values -> n rows, appending a FieldProblem per bad field (rows [] then)."""
        before = len(problems)
        for name in sorted(set(values) - set(self.names) - set(self.negative_fields)):
            keys = ", ".join(self.names) or "(none: the model is unconditional)"
            problems.append(
                FieldProblem((name,), f"unknown field; conditioning keys: {keys}", "extra")
            )
        per_key = {}
        for key in self.keys:
            try:
                per_key[key.name] = key.resolve(values.get(key.name), n)
            except FieldProblem as p:
                problems.append(p)
        if len(problems) > before:
            return []
        return [{name: v[i] for name, v in per_key.items()} for i in range(n)]

    def null_row(self) -> Row:
        return {k.name: k.null_row() for k in self.keys}

    @property
    def negative_fields(self) -> dict[str, str]:
        """{request field of a negative value: its key's name} (text keys with `negative`)."""
        return {k.negative: k.name for k in self.keys if getattr(k, "negative", None)}

    def resolve_negative(self, values: Mapping[str, Any], n: int) -> list[Row] | None:
        """The unconditional rows of guidance: null rows with the negative values given in
        `values` in place ({negative field: value}); None when no negative value is given."""
        given = {f: values[f] for f in self.negative_fields if values.get(f) is not None}
        if not given:
            return None
        rows = [self.null_row() for _ in range(n)]
        for f, value in given.items():
            name = self.negative_fields[f]
            for row, v in zip(rows, self.key(name).resolve(value, n, field=f), strict=True):
                row[name] = v
        return rows

    def fill_from_edit(
        self, rows: list[Row], uncond: list[Row] | None, images: Sequence[Tensor], masks
    ) -> tuple[list[Row], list[Row] | None]:
        """Rows (and guidance's unconditional rows) with each masked_image key built from the
        request's init images (C, H, W) in [-1, 1] and masks (1, H, W) in {0, 1}, per image;
        unchanged when the spec has no such key or the edit has no mask."""
        keys = [k for k in self.keys if k.kind == "masked_image"]
        if not keys or masks is None:
            return rows, uncond
        filled = [
            {**r, **{k.name: k.row(x, m) for k in keys}}
            for r, x, m in zip(rows, images, masks, strict=True)
        ]
        base = uncond or [self.null_row() for _ in rows]  # the known pixels stay in both
        return filled, [
            {**u, **{k.name: f[k.name] for k in keys}} for u, f in zip(base, filled, strict=True)
        ]

    def collate(self, rows: Sequence[Row]) -> dict[str, Tensor] | None:
        """Stack rows into the batched cond of a denoiser call (None for no keys)."""
        if not self.keys:
            return None
        return {k.name: torch.stack([r[k.name] for r in rows]) for k in self.keys}

    def null_batch(self, n: int) -> dict[str, Tensor] | None:
        return self.collate([self.null_row()] * n)

    def describe(self, row: Row) -> dict[str, Any]:
        """A row as JSON values (what provenance and the audit log record)."""
        return {k.name: k.describe_row(row[k.name]) for k in self.keys}

    def caption(self, row: Row) -> str:
        return " ".join(k.caption(row[k.name]) for k in self.keys)

    def from_batch(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """Training: the cond of a data batch (each key reads its own source field)."""
        if not self.keys:
            return None
        return {k.name: k.from_batch(batch) for k in self.keys}

    def drop(self, cond: Mapping[str, Tensor] | None, generator: torch.Generator):
        """Training: each key's dropout to its null value, for classifier-free guidance."""
        if cond is None:
            return None
        out = {k.name: k.drop(cond[k.name], generator) for k in self.keys}
        if self.dropout_all:
            n = next(iter(out.values())).shape[0]
            drop = torch.rand(n, generator=generator) < self.dropout_all  # (B,)
            for k in self.keys:
                v, null = out[k.name], k.null_row().to(out[k.name].dtype)
                out[k.name] = torch.where(drop.view(-1, *[1] * (v.ndim - 1)), null, v)
        return out

    def augment(self, cond: Mapping[str, Tensor] | None, seeds: Sequence[int]):
        """Sampling: the batched cond with each image key's conditioning augmentation, its noise
        drawn from each sample's stream 2 (so it depends on that sample's seed only)."""
        augmenting = [k for k in self.keys if hasattr(k, "augment")]
        if cond is None or not augmenting:
            return cond
        from difforge.samplers.noise import PerSampleNoise

        out = dict(cond)
        for i, key in enumerate(augmenting):
            out[key.name] = key.augment(cond[key.name], PerSampleNoise(seeds).stream(2 + i))
        return out


def signature(row: Row) -> Signature:
    """What must agree for rows to be stacked into one call."""
    return tuple(sorted((k, str(v.dtype), tuple(v.shape)) for k, v in row.items()))
