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
    assert points[0] == {"steps": 600, "images": 600 * BATCH, "minutes": 10.0}
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
