"""benchmarks/fewstep.py: the 4-step target against the 50-step teacher, and students judged from
cached records (their folders under runs/ are not kept)."""

import json
from types import SimpleNamespace

import pytest

from benchmarks.fewstep import cached_record, verdicts


def _rec(steps, fid, acc=1.0, fwd=None, n=1000):
    return {"name": f"m{steps}", "steps": steps, "fid": fid, "label_accuracy": acc, "n": n,
            "seed": 0, "forwards_per_image": fwd or steps}  # fmt: skip


def test_the_4_step_target_is_judged_against_the_50_step_teacher_only():
    student = _rec(4, 120.0)
    v = verdicts(_rec(50, 100.0, fwd=100), _rec(20, 80.0, fwd=40), [student])
    t = v["fid_4step_within_1.3x_of_teacher50"]
    assert t["met"] is True and t["ratio"] == pytest.approx(1.2)
    assert t["ratio_to_teacher20"] == pytest.approx(1.5)  # context, not the verdict
    assert (
        verdicts(_rec(50, 90.0), None, [student])["fid_4step_within_1.3x_of_teacher50"]["met"]
        is False
    )
    assert verdicts(None, None, [student])["fid_4step_within_1.3x_of_teacher50"]["met"] is None


def test_a_cached_record_counts_only_at_the_runs_n_and_seed(tmp_path):
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(_rec(4, 58.9)))
    assert cached_record(str(path), SimpleNamespace(n=1000, seed=0))["fid"] == 58.9
    with pytest.raises(SystemExit, match="n=1000"):
        cached_record(str(path), SimpleNamespace(n=300, seed=0))


def test_fid_to_teacher_is_the_distance_to_the_teachers_own_features(tmp_path, monkeypatch):
    import numpy as np

    import benchmarks.fewstep as fewstep

    monkeypatch.setattr(fewstep, "CACHE", tmp_path)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(400, 8)).astype(np.float32)

    def rec(sha, sampler, steps, grid="karras"):
        r = {"sha256": sha * 16, "sampler": sampler, "steps": steps, "grid": grid,
             "guidance": 3.0, "n": 400, "seed": 0}  # fmt: skip
        return r

    teacher, same, shifted = rec("a", "dpmpp_2m", 50), rec("b", "euler", 1), rec("c", "x", 2, "vp")
    np.save(tmp_path / f"{fewstep._key(teacher)}.feats.npy", base)
    np.save(tmp_path / f"{fewstep._key(same)}.feats.npy", base)
    np.save(tmp_path / f"{fewstep._key(shifted)}.feats.npy", base + 1.0)
    missing = rec("d", "euler", 4)
    fewstep.add_fid_to_teacher(teacher, [teacher, same, shifted, missing])
    assert abs(same["fid_to_teacher50"]) < 1e-6 and abs(teacher["fid_to_teacher50"]) < 1e-6
    assert shifted["fid_to_teacher50"] == pytest.approx(8.0, rel=1e-3)  # |mean shift|^2 = 8
    assert "fid_to_teacher50" not in missing
    fewstep.add_fid_to_teacher(None, [same])  # no teacher point: nothing added, no error
