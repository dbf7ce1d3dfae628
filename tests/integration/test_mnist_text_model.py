"""The shipped text model: verified, its warm start recorded, and it draws the digit a prompt
names (judged by the shipped MNIST classifier, as benchmarks/prompt_following.py does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difforge.data.captions import DIGIT_WORDS
from difforge.evaluation import load_feature_extractor
from difforge.pipeline import load

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = Path(__file__).resolve().parents[2] / "models" / "mnist-text"


def test_the_shipped_text_model_records_its_warm_start():
    prov = load(MODEL).summary()["provenance"]
    assert prov["init"]["mode"] == "matching" and prov["init"]["loaded"] > 100
    assert prov["init_sha256"].startswith("ad67dc88")  # models/mnist-cond's weights


def test_the_shipped_text_model_draws_the_digit_its_prompt_names():
    model, judge = load(MODEL), load_feature_extractor()
    prompts = [f"the digit {DIGIT_WORDS[d]}" if d % 2 else f"a {d}" for d in range(10)]
    images = model.sample(cond={"prompt": prompts}, n=10, seed=0, steps=12).images
    pred = judge.logits(images.float() / 127.5 - 1).argmax(1)
    assert int((pred == torch.arange(10)).sum()) >= 9, pred.tolist()
    # and not by luck: the null prompt does not give the same digits
    blank = model.sample(cond={"prompt": [None] * 10}, n=10, seed=0, steps=12).images
    assert not torch.equal(blank, images)
