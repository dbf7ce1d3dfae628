"""The scenes prompt set and its judge: true captions of real scenes pass, wrong ones fail."""

from __future__ import annotations

from benchmarks.prompt_following_scenes import (
    CATEGORIES,
    SLOT_CATEGORIES,
    first_per_category,
    prompt_set,
)
from difforge.data.captions import DIGIT_WORDS
from difforge.data.scene_captions import (
    HELD_OUT_COMBOS,
    PLURAL_WORDS,
    SEEN,
    Clause,
    clause_slots,
    load_scene_captions,
)
from difforge.evaluation.scenes import judge_clauses

QUAD_WORDS = {0: ("top", "upper", "left"), 1: ("top", "upper", "right"),
              2: ("bottom", "lower", "left"), 3: ("bottom", "lower", "right")}  # fmt: skip


def test_prompt_set_categories_and_facts():
    prompts = prompt_set()
    assert {p["category"] for p in prompts} == set(CATEGORIES)
    assert "thickness" not in SLOT_CATEGORIES and "size" not in SLOT_CATEGORIES
    assert prompt_set() == prompts  # fixed
    combos = set(HELD_OUT_COMBOS)
    for p in prompts:
        placed = {(c.digit, q) for c in p["clauses"] for q in c.quadrants}
        assert bool(placed & combos) == (p["category"] == "combo_held_out"), p
        for c in p["clauses"]:
            words = set(p["prompt"].replace("-", " ").split())
            assert words & {
                str(c.digit),
                f"{c.digit}s",
                DIGIT_WORDS[c.digit],
                PLURAL_WORDS[c.digit],
            }
            for q in c.quadrants:
                v, u, h = QUAD_WORDS[q]
                assert (v in p["prompt"] or u in p["prompt"]) and h in p["prompt"]
        if p["category"] == "position_held_out":
            assert "corner" in p["prompt"] and ("upper-" in p["prompt"] or "lower-" in p["prompt"])
        if p["category"].startswith("count"):
            assert p["clauses"] == [Clause(p["clauses"][0].digit, 2)]
        if p["category"] == "thickness":
            synonyms = SEEN.digits.thick[p["clauses"][0].thickness]
            assert any(w in p["prompt"].split() for w in synonyms)
        if p["category"] == "size":
            synonyms = SEEN.digits.size[p["clauses"][0].size]
            assert any(w in p["prompt"].split() for w in synonyms)
        assert len(clause_slots(p["clauses"])) == 4
    assert [p["category"] for p in first_per_category(prompts, 1)] == list(CATEGORIES)


def test_judge_passes_real_scenes_with_their_captions_and_fails_other_captions(extractor):
    test = load_scene_captions("test", limit=120)
    clauses = list(test.clauses)
    own = judge_clauses(extractor, test.images, clauses, test.scene_thresholds)
    shifted = judge_clauses(
        extractor, test.images, clauses[1:] + clauses[:1], test.scene_thresholds
    )
    assert sum(own) >= 0.85 * len(own)  # the ceiling: classifier and ink measurement errors only
    assert sum(shifted) <= 0.1 * len(own)
