"""Training a layout planner (difforge.nets.layout): captions -> the scene's slots, by cross-entropy.

The planner is the text-to-layout stage of a scenes text pipeline (difforge.pipeline.layout). Its
data is a captioned scene set (kind "scene_captions"): each scene's caption (token ids) and its
slots (a class or empty per quadrant). The captions are drawn under `caption_seeds` caption seeds
(the same scenes, other phrasings, open positions and clause orders: the tokenizer does not depend
on the seed), so the planner sees several statements of each layout. Loss: the mean over cells of
-log p(s_j | s_<j, y) with the true earlier cells (teacher forcing).

Evaluation (`layout_report`): on the held-out test scenes' captions, the fraction of layouts drawn
(one per caption, seeded) that satisfy every clause's digits, counts and stated quadrants, and the
same on the scenes benchmark's prompt categories. The result is a component folder
(config.json = LayoutConfig, model.safetensors, README.md, manifest.json) that a text model's
TrainConfig names by path (`layout`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from difforge.core.errors import InvalidArgumentError
from difforge.data import load_dataset
from difforge.data.scene_captions import facts_hold
from difforge.data.tokenizer import UNK_ID, tokenizer_sha256
from difforge.nets import build_net, count_parameters
from difforge.nets.layout import LayoutPlanner
from difforge.pipeline import LayoutConfig, NetSpec, code_version
from difforge.pipeline.artifact import save_component
from difforge.pipeline.layout import draw_layouts


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _default_net() -> NetSpec:
    encoder = {"vocab_size": 72, "max_tokens": 32, "width": 64, "depth": 2, "heads": 2}
    return NetSpec(kind="layout_planner", config={"cells": 4, "tokens": 11, "encoder": encoder})


class LayoutTrainConfig(_Frozen):
    """Everything that determines a planner training run (CPU-deterministic)."""

    net: NetSpec = Field(default_factory=_default_net)
    dataset: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "scene_captions", "split": "train", "max_tokens": 32}
    )  # a scene_captions spec; its "seed" is replaced by each of the caption seeds
    caption_seeds: int = Field(4, ge=1)  # captions drawn under seeds 0 .. caption_seeds - 1
    # words that end a clause: the planner's segment embeddings (their ids fill the net config's
    # `separators`); [] = none
    separator_words: tuple[str, ...] = ()
    # training: each word of a caption is removed with this probability (the rest close up), so
    # the planner leans on the words a fact needs, not on one template's word order
    word_dropout: float = Field(0.0, ge=0, lt=1)
    # the words word_dropout may remove (e.g. function words: a fact's own words then never go,
    # so no caption loses what its layout label says); () = every word
    dropout_words: tuple[str, ...] = ()
    lr: float = Field(1e-3, gt=0)  # AdamW, linear warmup then cosine to 0
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(256, ge=1)
    max_steps: int = Field(3000, ge=1)
    seed: int = Field(0, ge=0)
    log_every: int = Field(100, ge=1)
    eval_n: int = Field(2000, ge=1)  # test captions the report draws layouts for
    eval_seeds: int = Field(8, ge=1)  # layouts drawn per benchmark prompt in the report

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def _data(config: LayoutTrainConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(ids (N, L), slots (N, cells), tokenizer JSON) over every caption seed."""
    if config.dataset.get("kind") != "scene_captions":
        raise InvalidArgumentError("a layout planner trains on a 'scene_captions' data set")
    ids, slots, tokenizer = [], [], None
    for s in range(config.caption_seeds):
        data = load_dataset({**config.dataset, "seed": s})
        fields = data.fields()
        ids.append(fields["prompt"])
        slots.append(fields["slots"])
        if tokenizer not in (None, data.tokenizer):
            raise InvalidArgumentError("caption seeds gave different tokenizers")
        tokenizer = data.tokenizer
    return torch.cat(ids), torch.cat(slots), tokenizer


def _lr(config: LayoutTrainConfig, step: int) -> float:
    import math

    warm = min(1.0, (step + 1) / max(config.warmup_steps, 1))
    return config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / config.max_steps))


def _fit(
    net: LayoutPlanner, ids, slots, config, metrics: Path, log, eligible: torch.Tensor | None
) -> tuple[int, float, float]:
    """AdamW on the cross-entropy until max_steps: (steps, last loss, seconds)."""
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    perm, pos, start, loss = torch.randperm(len(ids), generator=gen), 0, time.monotonic(), None
    with open(metrics, "w") as out:
        for step in range(config.max_steps):
            if pos + config.batch_size > len(ids):
                perm, pos = torch.randperm(len(ids), generator=gen), 0
            idx = perm[pos : pos + config.batch_size]
            pos += config.batch_size
            for group in opt.param_groups:
                group["lr"] = _lr(config, step)
            x = ids[idx]
            if config.word_dropout:
                x = drop_words(x, config.word_dropout, gen, eligible)
            logits = net.logits(x, slots[idx])  # (B, cells, tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), slots[idx].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
                row = {"step": step + 1, "loss": round(loss.item(), 5)}
                out.write(json.dumps(row) + "\n")
                log(f"layout step {step + 1}: loss {loss.item():.4f}")
    return config.max_steps, float(loss.item()), time.monotonic() - start


def drop_words(
    ids: torch.Tensor, p: float, gen: torch.Generator, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """Remove each word id (not [CLS], not [PAD]; only ids in `eligible` when given) with
    probability p; the rest move left."""
    from difforge.data.tokenizer import CLS_ID, PAD_ID

    word = (ids != PAD_ID) & (ids != CLS_ID)
    if eligible is not None:
        word &= torch.isin(ids, eligible)
    keep = ~word | (torch.rand(ids.shape, generator=gen) >= p)
    keep &= ids != PAD_ID
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept ids first, in order
    out = ids.gather(1, order)
    return out.masked_fill(~keep.gather(1, order), PAD_ID)


def layout_holds(clauses, slots: Sequence[int]) -> bool:
    """Do these slots state every clause's digits, counts and quadrants (adjectives aside)?"""
    bare = [replace(c, thickness=None, size=None) for c in clauses]
    return facts_hold(bare, slots, [("", "")] * len(slots))


def layout_report(
    planner: LayoutPlanner, n: int, max_tokens: int, seeds: int = 8
) -> dict[str, Any]:
    """Valid-layout fractions on test captions (n) and on the scenes benchmark's prompt set."""
    planner.eval()
    test = load_dataset({"kind": "scene_captions", "split": "test", "max_tokens": max_tokens})
    k = min(n, len(test.clauses))
    drawn = draw_layouts(planner, test.fields()["prompt"][:k], range(k))
    ok = [layout_holds(c, s.tolist()) for c, s in zip(test.clauses[:k], drawn, strict=True)]
    report: dict[str, Any] = {"test_captions": {"n": k, "fraction": round(sum(ok) / k, 4)}}
    report["prompt_categories"] = _prompt_categories(planner, test.tokenizer, max_tokens, seeds)
    return report


def _prompt_categories(planner: LayoutPlanner, tokenizer: str, max_tokens: int, seeds: int) -> dict:
    """Per category of the scenes benchmark's prompts (scene_captions.prompt_set): valid layouts
    over `seeds` seeds per prompt."""
    from difforge.data.scene_captions import prompt_set
    from difforge.data.tokenizer import tokenizer_from_json

    tok = tokenizer_from_json(tokenizer)
    per: dict[str, list[bool]] = {}
    for p in prompt_set():
        ids = torch.tensor([tok.encode(p["prompt"], max_tokens)] * seeds)
        for s in draw_layouts(planner, ids, range(seeds)):
            per.setdefault(p["category"], []).append(layout_holds(p["clauses"], s.tolist()))
    return {c: {"n": len(v), "fraction": round(sum(v) / len(v), 4)} for c, v in per.items()}


def train_layout(
    config: LayoutTrainConfig, out: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train a planner and write its component folder to `out`; returns the report."""
    out = Path(out)
    ids, slots, tokenizer = _data(config)
    if config.separator_words:
        seps = [_word_id(tokenizer, w) for w in config.separator_words]
        net_spec = config.net.model_copy(
            update={"config": {**config.net.config, "separators": seps}}
        )
        config = config.model_copy(update={"net": net_spec})
    torch.manual_seed(config.seed)
    net = build_net(config.net.kind, config.net.config)
    if not isinstance(net, LayoutPlanner):
        kind = config.net.kind
        raise InvalidArgumentError(
            f"a layout planner needs net kind 'layout_planner', got {kind!r}"
        )
    from difforge.data.tokenizer import tokenizer_from_json

    vocab, enc = tokenizer_from_json(tokenizer).vocab_size, net.config.encoder
    if enc["vocab_size"] < vocab or enc["max_tokens"] != ids.shape[1]:
        raise InvalidArgumentError(
            f"planner encoder has vocab_size {enc['vocab_size']}, max_tokens {enc['max_tokens']}; "
            f"the captions need vocab_size >= {vocab} and max_tokens {ids.shape[1]}"
        )
    log(f"layout planner: {count_parameters(net) / 1e6:.2f}M params, {len(ids)} captions")
    run = out.parent / f"{out.name}.run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "train_config.json").write_text(config.to_json())
    eligible = None
    if config.dropout_words:
        eligible = torch.tensor([_word_id(tokenizer, w) for w in config.dropout_words])
    steps, loss, seconds = _fit(
        net.train(), ids, slots, config, run / "metrics.jsonl", log, eligible
    )
    report = layout_report(net.eval(), config.eval_n, ids.shape[1], config.eval_seeds)
    provenance = {
        "dataset": config.dataset, "caption_seeds": config.caption_seeds,
        "captions": len(ids), "steps": steps, "final_loss": round(loss, 5),
        "train_seconds": round(seconds, 1), "parameters": count_parameters(net),
        "report": report, "code_version": code_version(), "train_config": config.model_dump(mode="json"),
    }  # fmt: skip
    sha = tokenizer_sha256(tokenizer)
    layout = LayoutConfig(net=config.net, tokenizer_sha256=sha, provenance=provenance)
    save_component(out, layout, net.state_dict(), _card(layout))
    return {"folder": str(out), **provenance}


def _word_id(tokenizer: str, word: str) -> int:
    """The id of one vocabulary word (an unknown one is refused)."""
    from difforge.data.tokenizer import tokenizer_from_json

    ids = tokenizer_from_json(tokenizer).encode(word, 3)  # [CLS] word [PAD]
    if ids[1] == UNK_ID:
        raise InvalidArgumentError(f"separator {word!r} is not one word of the vocabulary")
    return ids[1]


def _card(layout: LayoutConfig) -> str:
    p = layout.provenance
    cats = ", ".join(
        f"{c} {v['fraction']:.1%}" for c, v in p["report"]["prompt_categories"].items()
    )
    test = p["report"]["test_captions"]
    return (
        "# layout planner\n\nThe text-to-layout stage of a scenes text pipeline "
        "(difforge.nets.layout, difforge.pipeline.layout): prompt -> one token per quadrant.\n\n"
        f"- {p['parameters']} parameters, {p['steps']} steps on {p['captions']} captions "
        f"({p['caption_seeds']} caption seeds), final loss {p['final_loss']}, "
        f"{p['train_seconds']} s\n"
        f"- valid layouts on test captions: {test['fraction']:.1%} (n={test['n']})\n"
        f"- valid layouts per benchmark category ({p['train_config']['eval_seeds']} seeds per "
        f"prompt): {cats}\n"
    )
