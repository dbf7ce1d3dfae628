"""The layout stage of a text pipeline: planned slots drawn from the prompt, per image, seeded.

A pipeline whose spec has a `planned` slots key and a "layout" component (LayoutConfig: a
difforge.nets.layout planner) fills every "planned" row before the sampler runs: the planner reads
the text key's token ids and draws the slots from uniforms of the image's own stream
`LAYOUT_STREAM` (samplers.noise.stream_seeds), one image at a time, so an image's layout depends
on its prompt and seed only, never on its batch. Rows whose slots the request gave are left as
they are; guidance's unconditional rows never hold "planned" (they are null or a negative prompt
with null slots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError
from difforge.pipeline.conditioning import ConditioningSpec, SlotsKey
from difforge.pipeline.config import LayoutConfig

LAYOUT_STREAM = 4  # per-sample stream of the layout draw (1 inpainting, 2 augmentation/renoise,
# 3 the cascade's upsampler)


def planned_key(spec: ConditioningSpec) -> SlotsKey | None:
    """The spec's planned slots key (None when it has none)."""
    return next((k for k in spec.keys if k.kind == "slots" and k.planned), None)


def check_layout(spec: ConditioningSpec, config: LayoutConfig | None, where: str) -> None:
    """A planned slots key needs a layout component that reads the spec's text key with the same
    tokenizer and fills that key with the same cells and tokens."""
    key = planned_key(spec)
    if key is None and config is None:
        return
    if key is None or config is None:
        missing = "a planned slots key" if key is None else "a layout component"
        raise InvalidArgumentError(f"{where}: a layout stage needs {missing}")
    from difforge.data.tokenizer import tokenizer_sha256

    text = spec.key(config.prompt)
    net = config.net.config
    if config.slots != key.name or text.kind != "text":
        raise InvalidArgumentError(
            f"{where}: the layout component reads {config.prompt!r} and fills "
            f"{config.slots!r}; the spec's keys are {spec.names}"
        )
    if tokenizer_sha256(text.tokenizer) != config.tokenizer_sha256:
        raise InvalidArgumentError(
            f"{where}: the layout planner was trained with another tokenizer"
        )
    if net.get("cells") != key.num_slots or net.get("tokens") != key.num_classes + 1:
        raise InvalidArgumentError(
            f"{where}: the planner draws {net.get('cells')} cells of {net.get('tokens')} tokens; "
            f"the key holds {key.num_slots} slots of {key.num_classes} classes + empty"
        )


def draw_layouts(planner: nn.Module, ids: Tensor, seeds: Sequence[int]) -> Tensor:
    """One layout per prompt ids (B, L), each from its seed's stream `LAYOUT_STREAM` and drawn
    alone (batch-free): int64 (B, cells)."""
    from difforge.samplers.noise import stream_seeds

    cells = planner.config.cells
    out = []
    for i, seed in enumerate(stream_seeds(list(seeds), LAYOUT_STREAM)):
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(1, cells, generator=g, dtype=torch.float64)  # (1, cells)
        out.append(planner.sample(ids[i : i + 1], u)[0])
    return torch.stack(out) if out else torch.zeros(0, cells, dtype=torch.int64)


def plan_layouts(
    planner: nn.Module | None,
    config: LayoutConfig | None,
    spec: ConditioningSpec,
    cond: Mapping[str, Tensor] | None,
    seeds: Sequence[int],
) -> Mapping[str, Tensor] | None:
    """`cond` with every "planned" slots row drawn by the planner from its image's seed."""
    key = planned_key(spec)
    if cond is None or key is None or key.name not in cond:
        return cond
    slots = cond[key.name]
    todo = [i for i in range(slots.shape[0]) if bool((slots[i] == key.plan).all())]
    if not todo:
        return cond
    if planner is None or config is None:
        raise InvalidArgumentError(f"slots {key.name!r} are planned, but there is no planner")
    out = slots.clone()
    out[todo] = draw_layouts(planner, cond[config.prompt][todo], [seeds[i] for i in todo])
    return {**cond, key.name: out}
