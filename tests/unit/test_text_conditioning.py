"""Prompts: captions from metadata, the tokenizer's rules, the text key, negative prompts."""

from __future__ import annotations

import random

import pytest
import torch

from difforge.data.captions import (
    DIGIT_PHRASES,
    HELD_OUT,
    SEEN,
    InkThresholds,
    caption,
    captions_for,
    ink_measurements,
    measure_digits,
)
from difforge.data.tokenizer import CLS_ID, PAD_ID, UNK_ID, PromptError, train_tokenizer
from difforge.pipeline import RequestInvalid, RequestLimits, SamplingDefaults, resolve
from difforge.pipeline.conditioning import FieldProblem
from tests.text_fixtures import CORPUS, MAX_TOKENS, tiny_text_spec


class _Model:  # what the resolver reads
    def __init__(self, spec):
        self.spec, self.sampling = spec, SamplingDefaults(steps=4)
        self.image_shape = (1, 28, 28)


def test_captions_are_deterministic_and_state_the_metadata():
    meta = [{"digit": 7, "thickness": "thick"}, {"digit": 3, "thickness": "medium"}] * 20
    a, b = captions_for(meta, SEEN, seed=1), captions_for(meta, SEEN, seed=1)
    assert a == b and captions_for(meta, SEEN, seed=2) != a
    words_7 = {"7", "seven"}
    for text, m in zip(a, meta, strict=True):
        assert words_7 & set(text.split()) if m["digit"] == 7 else "three" in text or "3" in text
        assert "thin" not in text and "light" not in text
    assert any("thick" in t or "bold" in t for t in a[::2])


def test_held_out_phrasings_never_appear_in_training_captions():
    rng = random.Random(0)
    seen = {
        caption({"digit": d, "thickness": "thick"}, SEEN, rng) for d in range(10) for _ in range(50)
    }
    held = {caption({"digit": d, "thickness": "thick"}, HELD_OUT, rng) for d in range(10)}
    assert not seen & held
    assert all("handwritten" in t and "heavy" in t for t in held)  # the last phrasing of each fact
    assert not any("handwritten" in t or "heavy" in t for t in seen)
    assert len(SEEN.digit) == len(DIGIT_PHRASES) - 1


def test_ink_measurements_separate_thick_from_thin_strokes():
    img = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    img[0, 0, 4:24, 12:14] = 255  # 2-pixel stroke, 20 rows
    img[1, 0, 4:24, 10:16] = 255  # 6-pixel stroke
    stroke, height = ink_measurements(img)
    assert stroke.tolist() == [2.0, 6.0] and height.tolist() == [20.0, 20.0]
    meta = measure_digits(img, [1, 1], InkThresholds(thin_below=3.0, thick_above=5.0))
    assert [m["thickness"] for m in meta] == ["thin", "thick"]


def test_tokenizer_rules_unknown_empty_long_control_and_bytes():
    tok = train_tokenizer(CORPUS)
    ids = tok.encode("A THICK 7", 6)
    assert ids[0] == CLS_ID and ids[-1] == PAD_ID and len(ids) == 6
    assert tok.encode("a purple 7", 6)[2] == UNK_ID  # unknown word -> [UNK], accepted
    assert tok.encode("", 6) == tok.encode("   ", 6) == [CLS_ID] + [PAD_ID] * 5  # null prompt
    with pytest.raises(PromptError, match="limit is 5"):
        tok.encode("a 7 a 7 a 7", 6)
    with pytest.raises(PromptError, match="U\\+001B"):
        tok.encode("a \x1b[31m 7", 6)
    with pytest.raises(PromptError, match="UTF-8"):
        tok.encode(b"a \xff 7", 6)
    with pytest.raises(PromptError, match="control character"):
        tok.encode("a \ud800 7", 6)  # a lone surrogate (not encodable as UTF-8)
    assert tok.decode(tok.encode("a purple 7", 6)) == "a [UNK] 7"


def test_text_key_resolves_cycles_examples_and_round_trips_describe():
    key = tiny_text_spec().keys[0]
    rows = key.resolve(["a 7", None, ""], 3)
    assert [r.shape for r in rows] == [(MAX_TOKENS,)] * 3 and rows[0].dtype == torch.int64
    assert torch.equal(rows[1], key.null_row()) and torch.equal(rows[2], key.null_row())
    assert [key.describe_row(r) for r in key.resolve(None, 3)] == ["a 7", "a 3", "a 7"]
    for text in ("a thick 7", "a purple 7", ""):
        (row,) = key.resolve(text, 1)
        assert torch.equal(key.resolve(key.describe_row(row), 1)[0], row)  # replay is exact
    with pytest.raises(FieldProblem) as e:
        key.resolve(["a 7", 5], 2)
    assert e.value.loc == ("prompt", 1) and "must be text" in e.value.msg


def test_text_dropout_replaces_whole_prompts_by_the_null_prompt():
    spec = tiny_text_spec()
    key = spec.keys[0].model_copy(update={"dropout": 0.5})
    ids = torch.stack(key.resolve("a thick 7", 1) * 400)  # (400, L)
    out = key.drop(ids, torch.Generator().manual_seed(0))
    null = (out == key.null_row()).all(dim=1)
    assert torch.equal(out[~null], ids[~null]) and 150 < int(null.sum()) < 250


def test_resolver_errors_name_the_field_and_the_limit():
    model = _Model(tiny_text_spec())
    with pytest.raises(RequestInvalid) as e:
        resolve(model, {"prompt": "a 7 a 7 a 7", "negative_prompt": ["ok", "\x00"], "n": 2})
    errors = {tuple(x["loc"]): x["msg"] for x in e.value.errors()}
    assert "limit is 5" in errors[("prompt",)]
    assert "control character" in errors[("negative_prompt", 1)]
    with pytest.raises(RequestInvalid, match="limit is 10"):
        resolve(model, {"prompt": "x" * 11}, RequestLimits(max_text_chars=10))
    with pytest.raises(RequestInvalid, match="unknown field"):
        resolve(model, {"promt": "a 7"})


def test_negative_prompt_becomes_the_plans_unconditional_rows():
    model = _Model(tiny_text_spec())
    plan = resolve(model, {"prompt": "a 7", "negative_prompt": [None, "a 3"], "seed": 0})
    key = model.spec.keys[0]
    assert plan.uncond_rows is not None and len(plan.uncond_rows) == 2
    assert torch.equal(plan.uncond_rows[0]["prompt"], key.null_row())
    assert key.describe_row(plan.uncond_rows[1]["prompt"]) == "a 3"
    assert plan.conditioning["negative_prompt"] == ["", "a 3"]
    again = resolve(model, plan.params())  # replay: the same rows and unconditional rows
    assert all(
        torch.equal(a["prompt"], b["prompt"])
        for a, b in zip(again.uncond_rows, plan.uncond_rows, strict=True)
    )
    assert resolve(model, {"prompt": "a 7"}).uncond_rows is None


def test_held_out_attribute_combinations_are_never_stated_together():
    meta = [{"digit": d, "thickness": t} for d in (4, 7) for t in ("thick", "thin")] * 50
    texts = captions_for(meta, SEEN, seed=0, held_out_combos=[(4, "thick")])
    thick = ("thick", "bold")
    four = [t for t, m in zip(texts, meta, strict=True) if m["digit"] == 4]
    assert not any(w in t for t in four for w in thick)  # "thick 4" is held out
    assert any(w in t for t in texts for w in thick)  # thick is still seen (on 7s)
    assert any("thin" in t or "light" in t for t in four)  # and 4 with other attributes
