"""The layout stage: the planner net (causal, inverse-CDF draws), the planned slots key, the
per-image seeded planning of a batch, the planner's training and its component folder."""

from __future__ import annotations

import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.nets import build_net
from difforge.nets.layout import LayoutPlanner
from difforge.pipeline.conditioning import ConditioningSpec, FieldProblem, SlotsKey, TextKey
from difforge.pipeline.layout import check_layout, plan_layouts

ENC = {"vocab_size": 72, "max_tokens": 32, "width": 16, "depth": 1, "heads": 2}


def tiny_planner(seed: int = 0) -> LayoutPlanner:
    torch.manual_seed(seed)
    return build_net("layout_planner", {"cells": 4, "tokens": 11, "depth": 1, "encoder": ENC})


def ids(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(4, 72, (batch, 32), generator=g)
    out[:, 0], out[:, 10:] = 2, 0  # [CLS] first, padding after 9 words
    return out


def test_logits_are_causal_over_cells():
    net = tiny_planner().eval()
    x = ids(3)
    slots = torch.randint(0, 11, (3, 4))
    base = net.logits(x, slots)
    assert base.shape == (3, 4, 11)
    for j in range(4):
        changed = slots.clone()
        changed[:, j] = (changed[:, j] + 1) % 11
        out = net.logits(x, changed)
        assert torch.equal(out[:, : j + 1], base[:, : j + 1])  # cells <= j never see cell j
        if j < 3:
            assert not torch.allclose(out[:, j + 1 :], base[:, j + 1 :])


def test_sample_is_inverse_cdf_and_greedy_at_temperature_zero():
    net = tiny_planner().eval()
    x = ids(2)
    low = net.sample(x, torch.zeros(2, 4, dtype=torch.float64))
    high = net.sample(x, torch.full((2, 4), 1 - 1e-12, dtype=torch.float64))
    greedy = net.sample(x, torch.rand(2, 4, dtype=torch.float64), temperature=0)
    for j in range(4):  # u = 0 takes the first token with mass, u -> 1 the last
        probs = torch.softmax(net.logits(x, low)[:, j].double(), 1)
        first = (probs.cumsum(1) <= 0).sum(1)
        assert torch.equal(low[:, j], first)
        p_high = torch.softmax(net.logits(x, high)[:, j].double(), 1)
        assert torch.equal(high[:, j], (p_high.cumsum(1) <= 1 - 1e-12).sum(1).clamp(max=10))
        assert torch.equal(greedy[:, j], net.logits(x, greedy)[:, j].argmax(1))
    with pytest.raises(InvalidArgumentError, match="u must have shape"):
        net.sample(x, torch.zeros(2, 3))


def test_planned_slots_key_rows_values_and_description():
    key = SlotsKey(planned=True)
    rows = key.resolve(None, 2)
    assert all(torch.equal(r, key.plan_row()) for r in rows)
    assert key.describe_row(rows[0]) == "planned" and key.caption(rows[0]) == "planned"
    assert torch.equal(key.resolve(["planned", "_6/3_"], 2)[0], key.plan_row())  # a replay
    assert key.resolve("_6/3_", 1)[0].tolist() == [10, 6, 3, 10]  # an explicit layout wins
    with pytest.raises(FieldProblem, match="no layout stage"):
        SlotsKey().resolve("planned", 1)


def test_dropout_all_nulls_every_key_together():
    spec = ConditioningSpec(keys=(SlotsKey(dropout=0.0), SlotsKey(name="b", dropout=0.0)),
                            dropout_all=1.0)  # fmt: skip
    cond = {
        "slots": torch.zeros(40, 4, dtype=torch.int64),
        "b": torch.ones(40, 4, dtype=torch.int64),
    }
    out = spec.drop(cond, torch.Generator().manual_seed(0))
    assert (out["slots"] == 11).all() and (out["b"] == 11).all()
    half = spec.model_copy(update={"dropout_all": 0.5}).drop(cond, torch.Generator().manual_seed(0))
    dropped = (half["slots"] == 11).all(1)
    assert torch.equal(dropped, (half["b"] == 11).all(1)) and 5 < int(dropped.sum()) < 35


def _layout_config(tokenizer: str):
    from difforge.data.tokenizer import tokenizer_sha256
    from difforge.pipeline import LayoutConfig, NetSpec

    net = NetSpec(kind="layout_planner", config={"cells": 4, "tokens": 11, "depth": 1,
                                                  "encoder": ENC})  # fmt: skip
    return LayoutConfig(net=net, tokenizer_sha256=tokenizer_sha256(tokenizer))


def _spec(tokenizer: str) -> ConditioningSpec:
    return ConditioningSpec(keys=(TextKey(tokenizer=tokenizer, max_tokens=32),
                                  SlotsKey(planned=True)))  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> str:
    from difforge.data.scene_captions import SEEN, vocabulary_corpus
    from difforge.data.tokenizer import train_tokenizer

    return train_tokenizer(vocabulary_corpus(SEEN)).to_json()


def test_plan_layouts_fills_planned_rows_per_image_seed_only(tokenizer):
    spec, config, net = _spec(tokenizer), _layout_config(tokenizer), tiny_planner().eval()
    key = spec.key("slots")
    given = torch.tensor([1, 2, 3, 10])
    cond = {"prompt": ids(3), "slots": torch.stack([key.plan_row(), given, key.plan_row()])}
    out = plan_layouts(net, config, spec, cond, [5, 6, 7])
    assert torch.equal(out["slots"][1], given)  # a row the request gave is left alone
    assert (out["slots"] <= 10).all() and (out["slots"][[0, 2]] != key.plan).all()
    for i, seed in ((0, 5), (2, 7)):  # image i's layout is the one it gets alone
        alone = {"prompt": cond["prompt"][i : i + 1], "slots": key.plan_row()[None]}
        assert torch.equal(plan_layouts(net, config, spec, alone, [seed])["slots"][0],
                           out["slots"][i])  # fmt: skip
    draws = {tuple(plan_layouts(net, config, spec, {**cond}, [s, 6, 7])["slots"][0].tolist())
             for s in range(20)}  # fmt: skip
    assert len(draws) > 1  # the seed draws the layout
    with pytest.raises(InvalidArgumentError, match="no planner"):
        plan_layouts(None, None, spec, cond, [5, 6, 7])


def test_check_layout_refuses_a_mismatched_planner(tokenizer):
    spec, config = _spec(tokenizer), _layout_config(tokenizer)
    check_layout(spec, config, "here")
    with pytest.raises(InvalidArgumentError, match="another tokenizer"):
        check_layout(spec, config.model_copy(update={"tokenizer_sha256": "0" * 64}), "here")
    with pytest.raises(InvalidArgumentError, match="needs a layout component"):
        check_layout(spec, None, "here")
    with pytest.raises(InvalidArgumentError, match="needs a planned slots key"):
        check_layout(ConditioningSpec(keys=(spec.keys[0],)), config, "here")


def test_train_layout_writes_a_loadable_component(tmp_path):
    from difforge.pipeline.artifact import load_component
    from difforge.training.layout import LayoutTrainConfig, train_layout

    torch.set_num_threads(1)
    net = {"kind": "layout_planner", "config": {"cells": 4, "tokens": 11, "depth": 1,
                                                "encoder": ENC}}  # fmt: skip
    cfg = LayoutTrainConfig(
        net=net, dataset={"kind": "scene_captions", "split": "train", "limit": 256},
        caption_seeds=2, max_steps=40, batch_size=64, lr=3e-3, warmup_steps=5, log_every=20,
        eval_n=64, eval_seeds=1,
    )  # fmt: skip
    result = train_layout(cfg, tmp_path / "planner", log=lambda _: None)
    assert result["captions"] == 512 and result["steps"] == 40
    assert result["final_loss"] < 2.3  # below a uniform guess over 11 tokens (ln 11 = 2.40)
    report = result["report"]
    assert report["test_captions"]["n"] == 64 and 0 <= report["test_captions"]["fraction"] <= 1
    assert "position" in report["prompt_categories"]
    config, loaded, sha, _ = load_component(tmp_path / "planner", "layout")
    assert config.provenance["steps"] == 40 and len(sha) == 64
    assert isinstance(loaded, LayoutPlanner)
    assert "valid layouts" in (tmp_path / "planner" / "README.md").read_text()


def test_segment_embeddings_count_clauses_by_separators():
    torch.manual_seed(0)
    net = build_net("layout_planner", {"cells": 4, "tokens": 11, "depth": 1, "encoder": ENC,
                                       "separators": [60, 59]}).eval()  # fmt: skip
    x = torch.tensor([[2, 5, 50, 60, 5, 51, 59, 5, 52] + [0] * 23])  # a 3 and a 4 , a 5
    seen = {}
    net.segment.register_forward_hook(lambda m, i, o: seen.update(seg=i[0]))
    net.encode(x)
    assert seen["seg"][0, :10].tolist() == [
        0,
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        2,
    ]  # a separator ends its clause
    plain = tiny_planner()
    assert plain.segment is None and set(plain.state_dict()) < set(net.state_dict())


def test_separator_words_must_be_vocabulary_words(tokenizer):
    from difforge.training.layout import _word_id

    assert _word_id(tokenizer, "and") == 60
    with pytest.raises(InvalidArgumentError, match="not one word"):
        _word_id(tokenizer, "handwritten")


def test_word_dropout_removes_words_and_keeps_the_order():
    from difforge.training.layout import drop_words

    x = torch.randint(3, 70, (2000, 20))
    x[:, 0], x[:, 15:] = 2, 0  # [CLS], 14 words, padding
    y = drop_words(x, 0.2, torch.Generator().manual_seed(0))
    assert (y[:, 0] == 2).all() and ((y != 0).sum(1) <= 15).all()
    kept = ((y != 0).sum(1).float().mean() - 1) / 14
    assert 0.77 < float(kept) < 0.83
    for row, src in zip(y[:20].tolist(), x[:20].tolist(), strict=True):
        it = iter(src)
        assert all(t in it for t in row if t)  # a subsequence of the caption
        assert row[row.index(0) :] == [0] * (20 - row.index(0)) if 0 in row else True
    assert torch.equal(drop_words(x, 0.0, torch.Generator()), x)
