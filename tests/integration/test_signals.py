"""1-D signals end to end, in-process: train a unet1d on synthetic sines, sample each class,
fit an anomaly detector on normal series and score new ones through the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

import difforge
from difforge.cli import app
from difforge.data import load_sines
from difforge.evaluation.anomaly import roc_auc
from difforge.pipeline.anomaly import load_detector
from difforge.training.config import parse_config
from difforge.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

NET = {
    "kind": "unet1d",
    "config": {
        "length": 32,
        "base_channels": 16,
        "channel_mults": [1, 2],
        "attention_resolutions": [16],
        "head_dim": 16,
        "norm_groups": 4,
    },
}


def _dominant_period(x: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.rfft(x, axis=-1))[..., 1:].argmax(-1) + 1


@pytest.fixture(scope="module")
def sines_model(tmp_path_factory):
    """A class-conditional unet1d trained ~250 steps on 3 classes of sines (1, 2, 3 periods)."""
    net = {**NET, "config": {**NET["config"], "num_classes": 3}}
    cfg = parse_config(
        {
            "net": net,
            "dataset": {"kind": "sines", "n": 192, "length": 32},
            "sigma_data": 0.7,
            "batch_size": 32,
            "max_steps": 250,
            "log_every": 50,
            "checkpoint_every": 250,
            "sample_every": 250,  # a line plot of series, not an image grid
            "optim": {"lr": 3e-3, "warmup_steps": 20},
            "ema": {"halflife_images": 800},
            "sampling": {"steps": 12, "guidance": 1.0},
        }
    )
    run = tmp_path_factory.mktemp("sines") / "run"
    result = train(cfg, run, progress=False)
    assert result.status == "completed" and math.isfinite(result.loss)
    assert (run / "samples" / "step-000000250.png").read_bytes()[:4] == b"\x89PNG"
    return result.model_dir


def test_class_conditional_series_have_their_class_frequency(sines_model):
    model = difforge.load(sines_model)
    assert model.image_shape == (1, 32) and model.num_classes == 3
    s = model.sample([0, 1, 2] * 4, seed=0)
    assert s.images.shape == (12, 1, 32) and s.images.dtype.is_floating_point
    periods = _dominant_period(s.images[:, 0].numpy())
    hits = (periods == np.asarray(s.labels) + 1).mean()
    assert hits >= 0.75, f"only {hits:.0%} of samples have their class's period: {periods}"
    # same seed, same series, alone or in a batch
    alone = model.sample([1], n=1, seeds=[s.seeds[4]])
    np.testing.assert_allclose(alone.images[0].numpy(), s.images[4].numpy(), atol=1e-4)


def test_series_sample_cli_writes_csv_and_png(sines_model, tmp_path):
    out = tmp_path / "s.csv"
    r = runner.invoke(
        app,
        [
            "series",
            "sample",
            "--model",
            str(sines_model),
            "--out",
            str(out),
            "--n",
            "3",
            "--labels",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = out.read_text().splitlines()
    assert rows[0].startswith("label,seed,v0") and len(rows) == 4
    assert all(row.startswith("2,") for row in rows[1:])
    png = tmp_path / "s.png"
    r = runner.invoke(app, ["series", "sample", "--model", str(sines_model), "--out", str(png)])
    assert r.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def _write_csv(path, x: np.ndarray) -> None:
    path.write_text("\n".join(",".join(f"{v:.5f}" for v in row) for row in x) + "\n")


def test_anomaly_fit_and_score_cli(tmp_path):
    data = load_sines(160, 32, 3, seed=5)
    x, y = data.series[:, 0].numpy(), data.labels.numpy()
    _write_csv(tmp_path / "normal.csv", x[y == 0][:40])  # train on 1-period sines only
    test_x = np.concatenate([x[y == 0][40:], x[y == 2][:10]])  # unseen normals, 3-period ones
    _write_csv(tmp_path / "test.csv", test_x)
    det_dir = tmp_path / "det"
    r = runner.invoke(
        app,
        [
            "anomaly",
            "fit",
            "--data",
            str(tmp_path / "normal.csv"),
            "--out",
            str(det_dir),
            "--steps",
            "150",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "threshold" in r.output and (det_dir / "anomaly.json").is_file()
    r = runner.invoke(
        app, ["anomaly", "score", str(tmp_path / "test.csv"), "--model", str(det_dir)]
    )
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln and ln[0].isdigit()]
    assert len(lines) == len(test_x)
    scores = np.array([float(ln.split(",")[1]) for ln in lines])
    is_anomaly = np.r_[np.zeros(len(test_x) - 10), np.ones(10)].astype(bool)
    assert roc_auc(scores, is_anomaly) > 0.9
    flags = np.array([int(ln.split(",")[2]) for ln in lines])
    assert flags[is_anomaly].mean() > flags[~is_anomaly].mean()
    det = load_detector(det_dir)
    assert det.info["train_size"] + det.info["val_size"] == 40
    # a bad file is one readable line
    r = runner.invoke(
        app, ["anomaly", "score", str(tmp_path / "nope.csv"), "--model", str(det_dir)]
    )
    assert r.exit_code == 2 and "no such file" in r.output
    _score_over_http(det_dir, test_x, scores)


def _score_over_http(det_dir, test_x: np.ndarray, cli_scores: np.ndarray) -> None:
    """The served detector gives the CLI's scores; no detector is a 404, bad series a 422."""
    from difforge.serving import ServiceConfig
    from difforge.serving.app import build_service
    from tests.integration.serving_fixtures import run, running

    service = build_service(det_dir, ServiceConfig(audit_db=":memory:", warmup_steps=1))
    assert service.detector is not None

    async def scenario():
        async with running(service) as c:
            body = {"series": [[round(float(v), 5) for v in row] for row in test_x[:6]]}
            r = await c.post("/v1/anomaly/score", json=body)
            assert r.status_code == 200, r.text
            got = np.array(r.json()["scores"])
            np.testing.assert_allclose(got, cli_scores[:6], rtol=1e-4)
            assert r.json()["flagged"] == [bool(v > r.json()["threshold"]) for v in got]
            for bad in ({"series": []}, {"series": [[1.0, "x"]]}, {"other": 1}):
                assert (await c.post("/v1/anomaly/score", json=bad)).status_code == 422
            gen = await c.post("/v1/generate", json={"n": 2, "seed": 1, "response_format": "csv"})
            assert gen.status_code == 200 and gen.headers["content-type"].startswith("text/csv")
            assert len(gen.text.splitlines()) == 3 and gen.text.startswith("index,seed,channel,t0")

    run(scenario())


def test_series_over_http_are_json_or_csv_never_png(sines_model):
    from tests.integration.serving_fixtures import make_service, run, running

    lib = difforge.load(sines_model).sample([0, 2], seed=7)

    async def scenario():
        async with running(make_service(sines_model, warmup_steps=1)) as c:
            r = await c.post("/v1/generate", json={"labels": [0, 2], "seed": 7})
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            items = r.json()["series"]
            assert [i["conditioning"] for i in items] == [{"labels": 0}, {"labels": 2}]
            values = np.array([i["values"] for i in items], dtype=np.float32)
            assert values.shape == (2, 1, 32)
            np.testing.assert_allclose(values, lib.images.numpy(), atol=1e-4)
            csv = await c.post("/v1/generate", json={"labels": [1], "response_format": "csv"})
            assert csv.status_code == 200 and csv.text.splitlines()[0].startswith(
                "index,seed,labels"
            )
            png = await c.post("/v1/generate", json={"labels": [1], "response_format": "png"})
            assert png.status_code == 422 and "series" in png.text
            none = await c.post("/v1/anomaly/score", json={"series": [[0.0, 1.0]]})
            assert none.status_code == 404  # this service has no detector

    run(scenario())


def test_a_2d_net_on_series_is_refused_before_training(tmp_path):
    from difforge.core.errors import InvalidArgumentError
    from difforge.training.loop import describe

    series_cfg = {"dataset": {"kind": "sines", "n": 64, "length": 32}, "batch_size": 8}
    net = {**NET, "config": {**NET["config"], "num_classes": 3}}  # sines carry 3 labels
    d = describe(parse_config({**series_cfg, "net": net}))
    assert d["image_shape"] == [1, 32] and d["flops_per_forward"] > 0
    image_net = {
        "kind": "unet",
        "config": {
            "image_size": 32,
            "norm_groups": 8,
            "base_channels": 16,
            "num_classes": 3,
            "attention_resolutions": [8],
        },
    }
    with pytest.raises(InvalidArgumentError, match="takes images"):
        train(parse_config({**series_cfg, "net": image_net}), tmp_path / "r", progress=False)
    wrong_length = {**net, "config": {**net["config"], "length": 64, "attention_resolutions": [32]}}
    with pytest.raises(InvalidArgumentError, match="length is 64 but the dataset has 32"):
        describe(parse_config({**series_cfg, "net": wrong_length}))


def test_series_evaluation_metrics(sines_model):
    from difforge.evaluation.series import evaluate_series, train_series_classifier

    train_set = load_sines(192, 32, 3)  # the model's training data (the fixture's spec)
    reference = load_sines(120, 32, 3, seed=7)
    extractor = train_series_classifier(train_set, steps=200, seed=0)
    again = train_series_classifier(train_set, steps=200, seed=0)
    assert extractor.sha256 == again.sha256  # deterministic on the CPU
    report = evaluate_series(difforge.load(sines_model), extractor, reference, train_set, n=60)
    assert report["classifier_accuracy_on_reference"] > 0.95
    assert report["label_accuracy"] > 0.75
    assert 0 <= report["fd_series_floor_train_vs_reference"] < report["fd_series"] + 1.0
    assert report["memorization"]["memorization_rate"] < 0.5
    assert report["extractor"]["sha256"] == extractor.sha256
