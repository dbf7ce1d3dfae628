"""The shipped two-stage scenes text model: verified, its planner and warm start recorded, and it
puts the digits a prompt names where the prompt says (judged per quadrant by the shipped MNIST
classifier, as benchmarks/prompt_following_scenes.py does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from difforge.data.scene_captions import Clause, fit_scene_thresholds
from difforge.evaluation import load_feature_extractor
from difforge.evaluation.scenes import judge_clauses
from difforge.pipeline import load

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = Path(__file__).resolve().parents[2] / "models" / "scenes-text"


def test_the_shipped_scenes_model_holds_its_planner_and_warm_start():
    model = load(MODEL)
    summary = model.summary()
    assert summary["components"]["layout"]["net"] == "layout_planner"
    prov = summary["provenance"]
    assert prov["layout_sha256"] == model.pipeline.components["layout"].sha256
    assert prov["init"]["mode"] == "matching" and prov["init"]["loaded"] > 100
    assert model.layout_config.provenance["report"]["test_captions"]["fraction"] > 0.95


def test_the_shipped_scenes_model_places_the_digits_its_prompt_states():
    model, judge = load(MODEL), load_feature_extractor()
    cases = [
        ("a 7 in the top left", [Clause(7, 1, (0,))]),
        ("the digit three at the lower right", [Clause(3, 1, (3,))]),
        ("a 2 in the top right and a 5 in the bottom left", [Clause(2, 1, (1,)), Clause(5, 1, (2,))]),
        ("two sevens", [Clause(7, 2)]),
    ]  # fmt: skip
    prompts = [p for p, _ in cases for _ in range(2)]
    images = model.sample(cond={"prompt": prompts}, n=len(prompts), seed=0, steps=12).images
    ok = judge_clauses(judge, images, [c for _, c in cases for _ in range(2)],
                       fit_scene_thresholds())  # fmt: skip
    assert sum(ok) >= 6, ok  # the benchmark measures 95-99% for these categories at 20 steps
    # the layout follows the prompt, not a fixed default: the null prompt fails these facts
    blank = model.sample(cond={"prompt": [None] * len(prompts)}, n=len(prompts), seed=0, steps=12)
    assert sum(judge_clauses(judge, blank.images, [c for _, c in cases for _ in range(2)],
                             fit_scene_thresholds())) <= 2  # fmt: skip
