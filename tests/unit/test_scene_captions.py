"""Scene captions: deterministic, faithful to the scene, held-out phrasings and combos kept out."""

from __future__ import annotations

import random

import pytest

from difforge.core.errors import InvalidArgumentError
from difforge.data import load_dataset
from difforge.data.scene_captions import (
    HELD_OUT,
    HELD_OUT_COMBOS,
    SEEN,
    Clause,
    clause_slots,
    count_words,
    facts_hold,
    phrase,
    phrase_clause,
    phrase_stated,
    position_text,
)
from difforge.data.scenes import EMPTY
from difforge.data.tokenizer import UNK_ID

N = 300


@pytest.fixture(scope="module")
def data():
    return load_dataset({"kind": "scene_captions", "split": "test", "limit": N})


def _all_phrases(phr) -> set[str]:
    """Every filled-in position and count phrase of a phrasing set."""
    from difforge.data.scene_captions import count_text

    out = {position_text(t, q) for t in phr.position for q in range(4)}
    out |= {count_text(t, d, k) for t in phr.count + phr.pair for d in range(10) for k in (2, 3)}
    return out


def test_captions_are_deterministic_and_depend_on_the_seed(data):
    again = load_dataset({"kind": "scene_captions", "split": "test", "limit": N})
    other = load_dataset({"kind": "scene_captions", "split": "test", "limit": N, "seed": 1})
    assert data.captions == again.captions and data.content_hash == again.content_hash
    assert bool((data.token_ids == again.token_ids).all())
    assert other.captions != data.captions and other.content_hash != data.content_hash
    assert other.images_hash == data.images_hash  # same pixels: one latent encoding


def test_fields_carry_prompt_ids_and_slots(data):
    f = data.fields()
    assert f["prompt"].shape == (N, data.max_tokens) and f["slots"].shape == (N, 4)
    assert data.examples and data.tokenizer


def test_every_caption_states_the_scene_truly_and_a_changed_scene_fails(data):
    from difforge.data.scene_captions import quadrant_labels

    labels = quadrant_labels(data.images, data.scene_thresholds)
    for clauses, slots, lab in zip(data.clauses, data.slots.tolist(), labels, strict=True):
        assert facts_hold(clauses, slots, lab)
        assert sum(c.count for c in clauses) == sum(s != EMPTY for s in slots)
        filled = [q for q, s in enumerate(slots) if s != EMPTY]
        empty = [q for q, s in enumerate(slots) if s == EMPTY]
        if empty:  # a digit in an unmentioned quadrant breaks the caption
            extra = list(slots)
            extra[empty[0]] = 1
            assert not facts_hold(clauses, extra, lab)
        positioned = [c for c in clauses if c.quadrants]
        if positioned and empty:  # a stated digit moved to an empty quadrant
            moved = list(slots)
            q = positioned[0].quadrants[0]
            moved[empty[0]], moved[q] = moved[q], EMPTY
            assert not facts_hold(clauses, moved, lab)
        if filled:  # a wrong digit
            wrong = [(s + 1) % 10 if q == filled[0] else s for q, s in enumerate(slots)]
            assert not facts_hold(clauses, wrong, lab)


def test_positions_are_phrased_for_the_right_quadrant():
    words = {0: ("top", "upper", "left"), 1: ("top", "upper", "right"),
             2: ("bottom", "lower", "left"), 3: ("bottom", "lower", "right")}  # fmt: skip
    for q, (v, u, h) in words.items():
        for t in SEEN.position + HELD_OUT.position:
            text = position_text(t, q)
            assert (v in text or u in text) and h in text
            assert not ({"top", "upper", "bottom", "lower", "left", "right"} - {v, u, h}) & set(
                text.replace("-", " ").split()
            )
    rng = random.Random(0)
    texts = {phrase_clause(Clause(7, 1, (3,)), SEEN, rng) for _ in range(200)}
    assert all(("bottom" in t or "lower" in t) and "right" in t for t in texts)
    assert all(("7" in t or "seven" in t) for t in texts)


def test_counts_are_phrased_as_counts():
    rng = random.Random(0)
    two = {phrase_clause(Clause(7, 2), SEEN, rng) for _ in range(200)}
    assert two == {"two sevens", "two 7s", "two of the digit seven", "a pair of 7s"}
    three = {phrase_clause(Clause(6, 3), SEEN, rng) for _ in range(200)}
    assert three == {"three sixes", "three 6s", "three of the digit six"}
    assert {phrase_clause(Clause(1, 2), HELD_OUT, rng) for _ in range(20)} == {
        "two of the number 1"
    }
    placed = phrase_clause(Clause(7, 2, (0, 3)), SEEN, random.Random(1))
    assert placed.count(" and ") == 1 and "left" in placed and "right" in placed


def test_seen_and_held_out_phrasings_are_disjoint_and_held_out_ones_never_train(data):
    assert not set(SEEN.position) & set(HELD_OUT.position)
    assert not set(SEEN.count) & set(HELD_OUT.count)
    assert not set(SEEN.digits.digit) & set(HELD_OUT.digits.digit)
    seen, held = _all_phrases(SEEN), _all_phrases(HELD_OUT)
    assert not seen & held
    corpus = " | ".join(data.captions)
    for p in held:
        assert p not in corpus, p
    assert "handwritten" not in corpus  # captions.py's held-out digit phrasing
    assert any(p in corpus for p in seen)


def test_held_out_combos_are_never_stated_in_training_captions(data):
    combos = set(HELD_OUT_COMBOS)
    hidden = 0
    for clauses, slots in zip(data.clauses, data.slots.tolist(), strict=True):
        for c in clauses:
            assert not {(c.digit, q) for q in c.quadrants} & combos
        for d, q in combos:
            if slots[q] == d:
                hidden += 1
                (c,) = [c for c in clauses if c.digit == d]
                assert c.quadrants == ()
    assert hidden >= 5  # the test split does hold these combinations
    plain = load_dataset(
        {"kind": "scene_captions", "split": "test", "limit": N, "held_out_combos": []}
    )
    assert any(
        (c.digit, q) in combos for clauses in plain.clauses for c in clauses for q in c.quadrants
    )


def test_captions_fit_the_token_budget(data):
    assert max(count_words(t) for t in data.captions) <= data.max_tokens - 1
    assert not bool((data.token_ids == UNK_ID).any())  # the vocabulary covers seen phrasings
    # The longest scene there is: four different digits, each thick and large, all placed.
    worst = [Clause(d, 1, (q,), "thick", "large") for q, d in enumerate((7, 3, 8, 2))]
    for seed in range(50):
        text = phrase(worst, SEEN, random.Random(seed), 15)
        assert count_words(text) <= 15
    assert count_words(phrase(worst, SEEN, random.Random(0), 200)) > 31  # why the rule exists
    text, stated = phrase_stated(worst, SEEN, random.Random(0), 31)
    assert all(c.thickness is None and c.size is None for c in stated)  # the facts as stated
    assert "thick" not in text and [c.quadrants for c in stated] == [c.quadrants for c in worst]
    with pytest.raises(InvalidArgumentError, match="max_tokens >= 16"):
        load_dataset({"kind": "scene_captions", "split": "test", "limit": 4, "max_tokens": 8})


def test_clause_slots_places_stated_then_open_digits():
    clauses = [Clause(7, 2), Clause(3, 1, (1,))]
    assert clause_slots(clauses) == [7, 3, 7, None]
    with pytest.raises(InvalidArgumentError):
        clause_slots([Clause(1, 4), Clause(2, 1)])


def test_stated_facts_only_ignores_extra_digits_but_not_wrong_ones():
    lab = [("medium", "medium")] * 4
    placed = [Clause(7, 1, (0,), thickness="thick")]
    extra = [7, EMPTY, 3, EMPTY]
    assert not facts_hold(placed, extra, [("thick", "medium")] * 4)
    assert facts_hold(placed, extra, [("thick", "medium")] * 4, require_empty=False)
    assert not facts_hold(placed, extra, lab, require_empty=False)  # not thick
    assert not facts_hold(placed, [3, 7, EMPTY, EMPTY], lab, require_empty=False)  # moved
    two = [Clause(1, 2)]
    assert facts_hold(two, [1, EMPTY, EMPTY, 1], lab)
    assert not facts_hold(two, [1, 1, EMPTY, 1], lab)
    assert facts_hold(two, [1, 1, EMPTY, 1], lab, require_empty=False)
    assert not facts_hold(two, [1, EMPTY, EMPTY, 4], lab, require_empty=False)


def test_p_open_sets_how_often_a_single_digit_is_unplaced():
    never = load_dataset({"kind": "scene_captions", "split": "test", "limit": 100, "p_open": 0.0,
                          "held_out_combos": []})  # fmt: skip
    always = load_dataset({"kind": "scene_captions", "split": "test", "limit": 100, "p_open": 1.0})
    singles = [c for cs in never.clauses for c in cs if c.count == 1]
    assert singles and all(c.quadrants for c in singles)
    assert not any(c.quadrants for cs in always.clauses for c in cs if c.count == 1)
    with pytest.raises(InvalidArgumentError, match="p_open"):
        load_dataset({"kind": "scene_captions", "split": "test", "limit": 4, "p_open": 2.0})
