"""The report runner (`evaluate_model`) and the NFE sweep (`nfe_sweep`) on a tiny random model.

The model is an 8k-parameter EDM U-Net on 28x28 MNIST-shaped images (the shipped feature network
reads only those); references are 1000 real images, the memorization set 2000, so every run here
takes seconds. The numbers are those of an untrained network: the tests check the bookkeeping.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from difforge.core.errors import InvalidArgumentError, UnknownChoiceError
from difforge.data.mnist import ImageDataset, load_mnist
from difforge.evaluation import (
    METRIC_KEYS,
    SEED_STRIDE,
    EvalConfig,
    evaluate_model,
    image_seeds,
    make_labels,
    write_json,
)
from difforge.evaluation.reference import reference_stats
from difforge.evaluation.report import summarize
from difforge.model import ModelConfig, NetSpec, SamplingDefaults, load, save_model
from difforge.nets import UNetConfig, build_net

N = 150  # images per repeat: just above the 128 feature dimensions FID needs
FAST = {"steps": 2, "guidance": 2.0, "n": N, "threads": 1}


def make_tiny_model(
    folder: Path, *, seed: int = 0, image_size: int = 28, provenance: dict | None = None
) -> Path:
    """A random class-conditional EDM U-Net (8 channels, one level) saved as a model folder."""
    cfg = UNetConfig(
        in_channels=1, out_channels=1, image_size=image_size, base_channels=8, channel_mults=(1,),
        num_res_blocks=1, attention_resolutions=(), head_dim=8, num_classes=10, norm_groups=4,
        emb_mult=1,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net("unet", cfg)
    with torch.no_grad():  # the zero-initialised output layer would make every image the same
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    config = ModelConfig(
        name="tiny-mnist",
        net=NetSpec(kind="unet", config=cfg.to_dict()),
        process={"kind": "ve", "sigma_min": 0.002, "sigma_max": 80.0},
        parameterization="edm",
        num_classes=10,
        image_shape=(1, image_size, image_size),
        sampling=SamplingDefaults(sampler="dpmpp_2m", steps=4, guidance=2.0),
        provenance=provenance or {},
    )
    return save_model(folder, config, net.state_dict(), "# tiny-mnist\n\nrandom weights\n")


def small_references(extractor, cache_dir: Path) -> dict:
    """Test and train references of 1000 images each, and a 2000-image memorization set."""
    test, train = load_mnist("test"), load_mnist("train")
    sub = {
        "test": ImageDataset("mnist-test-1k", test.images[:1000], test.labels[:1000], 10),
        "train": ImageDataset("mnist-train-1k", train.images[:1000], train.labels[:1000], 10),
    }
    refs = {k: reference_stats(d, extractor, cache_dir=cache_dir) for k, d in sub.items()}
    memo = ImageDataset("mnist-train-2k", train.images[:2000], train.labels[:2000], 10)
    return {"reference": refs["test"], "other_references": {"train": refs["train"]}, "train": memo}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(make_tiny_model(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="module")
def against(extractor, tmp_path_factory):
    return {"extractor": extractor} | small_references(extractor, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    return tmp_path_factory.mktemp("out") / "reports" / "report.json"


@pytest.fixture(scope="module")
def report(model, against, report_path):
    return evaluate_model(model, out=report_path, **against, **FAST)


# --- the report ------------------------------------------------------------------------------


def test_report_records_everything_needed_to_reproduce_it(report, model, extractor, against):
    assert report["format"] == "difforge-eval-report/1"
    assert report["model"]["name"] == "tiny-mnist" and report["model"]["sha256"] == model.sha256
    s = report["sampler"]
    assert (s["name"], s["steps"], s["grid"], s["guidance"], s["nfe"]) == (
        "dpmpp_2m", 2, "karras", 2.0, 2,
    )  # fmt: skip
    assert s["knobs"] == {} and len(s["sigmas"]) == 3 and s["sigmas"][-1] == 0.0
    assert report["num_samples"] == N and report["num_repeats"] == 3
    assert report["seeds"] == [0, 1, 2]
    assert report["labels"] == {"policy": "balanced", "num_classes": 10}
    assert report["extractor"] == {"name": extractor.name, "sha256": extractor.sha256}
    assert report["reference"]["dataset_hash"] == against["reference"].dataset_hash
    assert report["other_references"]["train"]["name"] == "mnist-train-1k"
    assert report["train"]["content_hash"] == against["train"].content_hash
    assert report["software"]["difforge"] and report["software"]["git_commit"]
    assert datetime.fromisoformat(report["date"]).tzinfo is not None
    assert report["wall_time_s"] > 0
    assert report["config"]["n"] == N and report["config"]["seeds"] == (0, 1, 2)
    for r in report["repeats"]:
        assert r["nfe"] == 2 and r["label_counts"] == [15] * 10
        assert r["timings_s"]["sampling"] > 0


def test_report_file_is_strict_json_equal_to_the_returned_report(report, report_path):
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    on_disk = json.loads(report_path.read_text(), parse_constant=no_constants)
    assert on_disk == json.loads(json.dumps(report))


def test_metrics_have_mean_and_spread_over_three_repeats(report):
    expected = {*METRIC_KEYS, "fid_train"}
    assert set(report["metrics"]) == expected
    for name in expected:
        m = report["metrics"][name]
        values = [r["metrics"][name] for r in report["repeats"]]
        assert m["per_repeat"] == values and len(values) == 3
        assert m["mean"] == pytest.approx(np.mean(values))
        assert m["std"] == pytest.approx(np.std(values, ddof=1))
        assert (m["min"], m["max"]) == (min(values), max(values))
    fids = report["metrics"]["fid"]["per_repeat"]
    assert len(set(fids)) == 3  # the repeats draw different noise


def test_same_seeds_reproduce_identical_metrics(report, model, against):
    no_memo = {k: v for k, v in against.items() if k != "train"}
    again = evaluate_model(model, **no_memo, **FAST, memorization=False)
    for name, value in report["metrics"].items():
        if name in ("memorization_rate", "median_nn_ratio"):
            assert again["metrics"][name] is None and again["train"] is None
        else:
            assert again["metrics"][name] == value, name


def test_summarize_refuses_to_average_over_a_failed_repeat():
    assert summarize([1.0, 2.0, 3.0]) == {
        "mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "per_repeat": [1.0, 2.0, 3.0],
    }  # fmt: skip
    broken = summarize([1.0, float("nan"), 3.0])
    assert broken["mean"] is None and broken["min"] is None and len(broken["per_repeat"]) == 3
    assert summarize([None, None, None]) is None


def test_write_json_is_strict(tmp_path):
    path = write_json(
        tmp_path / "a" / "b.json", {"x": math.nan, "y": (1, math.inf), "z": -math.inf}
    )
    assert json.loads(path.read_text()) == {"x": None, "y": [1, "inf"], "z": "-inf"}


# --- seeds, labels, settings ------------------------------------------------------------------


def test_image_seeds_never_overlap_between_repeats_and_extend_as_prefixes():
    assert image_seeds(0, 3) == [0, 1, 2]
    assert image_seeds(2, 2) == [2 * SEED_STRIDE, 2 * SEED_STRIDE + 1]
    assert image_seeds(1, 10)[:4] == image_seeds(1, 4)
    assert not set(image_seeds(0, SEED_STRIDE)) & set(image_seeds(1, 5))
    with pytest.raises(InvalidArgumentError, match="n must be"):
        image_seeds(0, SEED_STRIDE + 1)


def test_label_policies():
    assert make_labels("balanced", 23, 10, seed=0)[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert np.bincount(make_labels("balanced", 1000, 10, seed=0)).tolist() == [100] * 10
    rnd = make_labels("random", 50, 10, seed=3)
    assert rnd == make_labels("random", 50, 10, seed=3) != make_labels("random", 50, 10, seed=4)
    assert make_labels("balanced", 5, 0, seed=0) is None
    with pytest.raises(UnknownChoiceError, match="balanced, random"):
        make_labels("stratified", 5, 10, seed=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"seeds": (0, 1)}, "at least 3 distinct"),
        ({"seeds": (0, 0, 1)}, "at least 3 distinct"),
        ({"sampler": "plms"}, "allowed values: ddpm"),
        ({"labels": "stratified"}, "balanced, random"),
        ({"reference_split": "val"}, "test, train"),
        ({"steps": 0}, "steps must be"),
        ({"n": 0}, "n must be"),
        ({"guidance": math.inf}, "finite"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_settings_raise_readable_errors(settings, message):
    with pytest.raises(InvalidArgumentError, match=message):
        EvalConfig(**settings)


def test_bad_calls_fail_before_sampling(model, against, tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"unknown setting.*allowed: sampler"):
        evaluate_model(model, **against, nfe=10)
    with pytest.raises(InvalidArgumentError, match="not both"):
        evaluate_model(model, EvalConfig(), **against, n=200)
    with pytest.raises(InvalidArgumentError, match="reference_split"):
        evaluate_model(model, reference="test")
    with pytest.raises(InvalidArgumentError, match="at least 129"):
        evaluate_model(model, **against, n=100)
    small = load(make_tiny_model(tmp_path / "small", image_size=8))
    with pytest.raises(InvalidArgumentError, match=r"makes \(1, 8, 8\) images.*cannot read"):
        evaluate_model(small, **against)
    folder = {"kind": "folder", "path": "digits/", "size": 28, "mode": "grayscale"}
    other = load(make_tiny_model(tmp_path / "other", provenance={"dataset": folder}))
    with pytest.raises(InvalidArgumentError, match=r"trained on .*folder.*default references"):
        evaluate_model(other, extractor=against["extractor"])
