"""The prompt-following judge: true facts of real digits hold, false ones do not."""

from __future__ import annotations

from benchmarks.prompt_following import CATEGORIES, judge, prompt_set
from difforge.data.captions import fit_thresholds, measure_digits
from difforge.data.mnist import load_mnist


def test_prompt_set_covers_every_category_and_digit():
    prompts = prompt_set()
    assert {p["category"] for p in prompts} == set(CATEGORIES)
    assert {p["digit"] for p in prompts} == set(range(10))
    held = [p["prompt"] for p in prompts if p["category"].endswith("held_out")]
    assert all("handwritten" in t for t in held)


def test_judge_accepts_true_facts_and_rejects_false_ones(extractor):
    test = load_mnist("test")
    images, labels = test.images[:200], test.labels[:200].tolist()
    thresholds = fit_thresholds(test.images[:2000])
    meta = measure_digits(images, labels, thresholds)
    true = [
        {"digit": m["digit"], "thickness": None if m["thickness"] == "medium" else m["thickness"]}
        for m in meta
    ]
    wrong_digit = [{**f, "digit": (f["digit"] + 1) % 10} for f in true]
    flip = {"thick": "thin", "thin": "thick"}
    wrong_thick = [{**f, "thickness": flip[f["thickness"]]} for f in true if f["thickness"]]
    thick_images = images[[i for i, f in enumerate(true) if f["thickness"]]]
    assert sum(judge(images, true, extractor, thresholds)) >= 195
    assert sum(judge(images, wrong_digit, extractor, thresholds)) <= 5
    assert sum(judge(thick_images, wrong_thick, extractor, thresholds)) == 0
