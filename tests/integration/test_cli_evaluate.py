"""`difforge evaluate` end to end, in-process: a report, an NFE sweep with its plot, the report
going through the registry's promotion gates, and bad input as one line with a non-zero exit.

MNIST is cut to 1000 test and 2000 train images (the runner's `load_mnist` is patched) so the
default references and the memorization set take a second; the model is the tiny random one of
tests/unit/test_eval_report.py.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from difforge.cli import app
from difforge.data.mnist import ImageDataset, load_mnist
from difforge.evaluation import against as against_module
from tests.unit.test_eval_report import N, make_tiny_model

runner = CliRunner()
FAST = ["--steps", "2", "--guidance", "2", "--n", str(N), "--threads", "1"]


def small_mnist(split: str = "train") -> ImageDataset:
    full = load_mnist(split)
    k = 1000 if split == "test" else 2000
    return ImageDataset(f"mnist-{split}-{k}", full.images[:k], full.labels[:k], 10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def small_data(monkeypatch):
    monkeypatch.setattr(against_module, "load_mnist", small_mnist)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-eval")
    make_tiny_model(root / "tiny")
    return root


def invoke(ws, *args: str):
    return runner.invoke(app, [*args, "--cache-dir", str(ws / "cache")])


def test_evaluate_writes_a_report_the_registry_promotes(ws):
    out = ws / "report.json"
    result = invoke(ws, "evaluate", "--model", str(ws / "tiny"), *FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: 3 repeats x {N} images, dpmpp_2m 2 steps")
    assert result.stderr.count("seed ") == 3  # one progress line per repeat
    report = json.loads(out.read_text())
    assert report["reference"]["name"] == "mnist-test-1000"
    assert report["other_references"]["train"]["name"] == "mnist-train-2000"
    assert report["train"]["name"] == "mnist-train-2000"
    assert report["config"]["threads"] == 1 and report["sampler"]["guidance"] == 2.0
    assert all(len(m["per_repeat"]) == 3 for m in report["metrics"].values())

    gates = ws / "gates.json"
    fid = report["metrics"]["fid"]["mean"]
    gates.write_text(json.dumps({"fid_max": fid * 1.01, "label_accuracy_min": 0.0}))
    reg = ["registry", "--registry", f"sqlite:///{ws}/registry.db"]
    r = runner.invoke(app, [*reg, "register", str(ws / "tiny"), "--report", str(out)])
    assert r.exit_code == 0 and "attached 1 evaluation report" in r.stdout, r.output
    r = runner.invoke(app, [*reg, "promote", "tiny-mnist", "1", "--gates", str(gates)])
    assert r.exit_code == 0, r.output
    assert f"pass  fid_max: fid {fid:.4g} <=" in r.stdout


def test_sweep_writes_points_and_a_plot(ws):
    out, plot = ws / "sweep.json", ws / "sweep.png"
    result = invoke(
        ws, "sweep", "--model", str(ws / "tiny"), "--nfe", "2,3", "--samplers",
        "euler,heun", "--reference-line", "euler:4", "--n", str(N), "--guidance", "1",
        "--threads", "1", "--out", str(out), "--plot", str(plot),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"wrote {out} and {plot}: 3 points of {N} images each; reference euler 4 NFE: fid "
        + result.stdout.split("fid ")[-1].strip()
    )
    sweep = json.loads(out.read_text())
    got = [(p["method"], p["target_nfe"], p["nfe"]) for p in sweep["points"]]
    assert got == [("euler", 2, 2), ("euler", 3, 3), ("heun", 2, 1)]
    # Heun at 2 steps (3 NFE) is left out: its corrector would run at sigma 0.002 after 80
    assert [(p["method"], p["target_nfe"]) for p in sweep["left_out"]] == [("heun", 3)]
    assert sweep["reference_line"]["nfe"] == 4 and sweep["guidance"] == 1.0
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,1"], "at least 3 distinct"),
        (["--seeds", "0,x,2"], "--seeds must be comma-separated integers"),
        (["--sampler", "plms"], "unknown sampler 'plms'; allowed values: ddpm"),
        (["--labels", "some"], "unknown label policy 'some'"),
        (["--reference-split", "val"], "unknown reference split 'val'"),
        (["--n", "100"], "FID needs more samples than feature dimensions"),
        (["sweep", "--nfe", "5,x"], "--nfe must be comma-separated integers"),
        (["sweep", "--nfe", "5", "--samplers", "heun,foo"], "unknown sampler 'foo'"),
        (["sweep", "--nfe", "5", "--reference-line", "heun"], "SAMPLER:STEPS or none"),
        (["sweep", "--nfe", "0"], "nfe budget must be an integer >= 1"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(ws, args, message):
    command = ["sweep", *args[1:]] if args[0] == "sweep" else ["evaluate", *args]
    result = invoke(
        ws, command[0], "--model", str(ws / "tiny"), "--out", str(ws / "x.json"), *command[1:]
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (ws / "x.json").exists()


def test_a_missing_model_is_one_line(ws):
    result = invoke(ws, "evaluate", "--model", str(ws / "nope"), "--out", str(ws / "x.json"))
    assert (
        result.exit_code == 2 and result.stderr.strip() == f"error: model not found: {ws / 'nope'}"
    )
