"""benchmarks.time_to_quality: step budgets (training work) are primary, minutes an option."""

from __future__ import annotations

import pytest

from benchmarks.time_to_quality import BATCH, parse_args, point_of, result_name, summarize


def test_steps_are_the_default_budget():
    args = parse_args([])
    assert args.budgets == [{"steps": 600}, {"steps": 1200}]
    assert parse_args(["--steps", "100,250"]).budgets == [{"steps": 100}, {"steps": 250}]


def test_minutes_budget_is_split_in_half():
    assert parse_args(["--minutes", "20"]).budgets == [{"minutes": 10.0}, {"minutes": 10.0}]


@pytest.mark.parametrize("bad", ["600,300", "0,10", "a,b", "600,600"])
def test_bad_step_budgets_are_one_line_errors(bad, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--steps", bad])
    assert "--steps" in capsys.readouterr().err


def test_summary_reports_images_wall_clock_and_targets():
    args = parse_args(["--no-diffusers", "--n", "500"])
    runs = [{"steps": 600, "seconds": 600.0}, {"steps": 1200, "seconds": 1500.0}]
    points = [point_of(r) for r in runs]
    assert points[0] == {"steps": 600, "images": 600 * BATCH, "minutes": 10.0, "img_per_s": 64.0}
    d = [
        p | {"fid": 90.0, "label_accuracy": a} for p, a in zip(points, (0.981, 0.985), strict=True)
    ]
    rate = {"difforge": 60.0, "diffusers": 50.0, "params": {"difforge": 1e6, "diffusers": 1e6}}
    text = summarize(
        args, {"difforge": d, "diffusers": []}, rate, {"fid": 15.0}, {"before": 2.0, "after": 3.0}
    )
    assert "600 steps (38,400 images)/10.0 min" in text
    assert "acc>=98% at 600 steps met" in text and "acc>=99% at 1200 steps NOT met" in text
    assert "diffusers (equal time)" not in text and "load 2.0->3.0" in text
    short = summarize(
        args, {"difforge": d[:1], "diffusers": []}, rate, {"fid": 15.0}, {"before": 1, "after": 1}
    )
    assert "acc>=99% at 1200 steps not measured" in short
    late = summarize(  # a 1200-step run alone says nothing of the 600-step target
        args, {"difforge": d[1:], "diffusers": []}, rate, {"fid": 15.0}, {"before": 1, "after": 1}
    )
    assert "acc>=98% at 600 steps not measured" in late


def test_recipe_screen_merges_overrides_key_by_key():
    from benchmarks.recipe_screen import merged

    base = {"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "P_mean": -1.2}
    out = merged(base, {"optim": {"lr": 2e-3}, "P_mean": -0.6})
    assert out == {"optim": {"lr": 2e-3, "betas": [0.9, 0.999]}, "P_mean": -0.6}
    assert base["optim"]["lr"] == 1e-3  # the base is left as it was


def test_result_name_keeps_one_json_per_recipe():
    assert result_name(parse_args([])) == "time_to_quality"
    short = parse_args(["--config", "configs/mnist-short-run.json"])
    assert result_name(short) == "time_to_quality_mnist-short-run"
    assert result_name(parse_args(["--quick"])) == "time_to_quality_quick"


class _FakeRecipe:
    """Counts steps; its 'EMA net' is the step count at the snapshot."""

    def __init__(self):
        self.count = 0

    def step(self):
        self.count += 1

    def ema_net(self):
        return self.count


def _clock(seconds_per_step: float):
    """A clock that advances `seconds_per_step` on every other read (once per step)."""
    state = {"t": 0.0, "reads": 0}

    def now():
        state["reads"] += 1
        if state["reads"] % 2 == 0:
            state["t"] += seconds_per_step
        return state["t"]

    return now


def test_diffusers_trains_to_equal_steps_and_equal_time_in_one_run():
    from benchmarks.time_to_quality import train_diffusers_matched

    runs = [{"steps": 10, "seconds": 5.0}, {"steps": 20, "seconds": 30.0}]
    recipe = _FakeRecipe()
    # 2 s per diffusers step: equal time is reached at steps 3 (6 s >= 5) and 15 (30 s >= 30)
    points = train_diffusers_matched(recipe, runs, "both", clock=_clock(2.0), load=lambda: 1.5)
    got = [(p["budget"], p["steps"], p["seconds"], p["net"]) for p in points]
    assert got == [
        ("equal time", 3, 6.0, 3),
        ("equal steps", 10, 20.0, 10),
        ("equal time", 15, 30.0, 15),
        ("equal steps", 20, 40.0, 20),
    ]
    assert recipe.count == 20  # the longer budget, not the sum of both
    assert all(p["load"] == 1.5 for p in points)
    only_steps = train_diffusers_matched(_FakeRecipe(), runs, "steps", clock=_clock(2.0))
    assert [(p["budget"], p["steps"]) for p in only_steps] == [
        ("equal steps", 10),
        ("equal steps", 20),
    ]
    only_time = train_diffusers_matched(_FakeRecipe(), runs, "time", clock=_clock(0.5))
    assert [(p["steps"], p["seconds"]) for p in only_time] == [(10, 5.0), (60, 30.0)]


def test_summary_shows_both_diffusers_budgets_with_rate_and_load():
    args = parse_args(["--steps", "600"])
    assert args.diffusers_budget == "both"
    d = [
        point_of({"steps": 600, "seconds": 1200.0, "load": 3.0})
        | {"fid": 70.0, "label_accuracy": 0.99}
    ]
    assert d[0]["img_per_s"] == 600 * BATCH / 1200.0 and d[0]["load"] == 3.0
    p = [
        point_of(r) | {"fid": f, "label_accuracy": a}
        for r, f, a in (
            ({"budget": "equal time", "steps": 500, "seconds": 1200.0, "load": 4.0}, 4000.0, 0.15),
            ({"budget": "equal steps", "steps": 600, "seconds": 1440.0, "load": 5.0}, 100.0, 0.2),
        )
    ]
    rate = {"difforge": 30.0, "diffusers": 25.0, "params": {"difforge": 1e6, "diffusers": 1e6}}
    load = {"before": 1.0, "after_difforge": 3.0, "after": 5.0}
    text = summarize(args, {"difforge": d, "diffusers": p}, rate, {"fid": 15.0}, load)
    assert "difforge 600 steps (38,400 images)/20.0 min (32.0 img/s, load 3.0): FID 70.0" in text
    assert (
        "diffusers (equal time) 500 steps (32,000 images)/20.0 min (26.7 img/s, load 4.0)" in text
    )
    assert "diffusers (equal steps) 600 steps (38,400 images)/24.0 min" in text
    assert "load 1.0->3.0->5.0" in text
    # FID is compared with the equal-steps point at difforge's last step (100 / 2 < 70)
    assert "FID<=half of diffusers' (equal steps) NOT met" in text


def test_result_name_keeps_non_default_step_budgets_apart():
    args = parse_args(["--steps", "600", "--config", "configs/mnist-short-run.json"])
    assert result_name(args) == "time_to_quality_mnist-short-run_steps600"
    assert result_name(parse_args(["--minutes", "20"])) == "time_to_quality"
