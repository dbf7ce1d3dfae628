"""`difforge train`, `sample` and `info` end to end, in-process, on a tiny image-folder dataset."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from difforge.cli import app
from tests.helpers import TINY_NET

pytestmark = pytest.mark.usefixtures("one_thread")


runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An image folder with 3 classes of 8x8 bands, a config for it, and one trained run."""
    root = tmp_path_factory.mktemp("cli")
    for k, name in enumerate(["a", "b", "c"]):
        (root / "images" / name).mkdir(parents=True)
        for i in range(8):
            img = Image.new("L", (8, 8), 30 + 3 * i)
            img.paste(220, (0, 2 * k, 8, 2 * k + 3))
            img.save(root / "images" / name / f"{i}.png")
    config = {
        "net": TINY_NET,
        "dataset": {"kind": "folder", "path": str(root / "images"), "size": 8, "mode": "grayscale"},
        "batch_size": 8,
        "max_steps": 6,
        "log_every": 2,
        "checkpoint_every": 3,
        "sample_every": 6,
        "sampling": {"steps": 3, "guidance": 2.0},
    }
    (root / "config.json").write_text(json.dumps(config))
    with torch.random.fork_rng(devices=[]):
        result = invoke("train", "--config", root / "config.json", "--out", root / "run")
    assert result.exit_code == 0, result.output
    assert "completed at step 6" in result.stdout
    return root


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_writes_a_loadable_model(workspace):
    run = workspace / "run"
    names = {p.name for p in (run / "model").iterdir()}
    assert names == {"config.json", "model.safetensors", "README.md", "manifest.json"}
    card = (run / "model" / "README.md").read_text()
    assert "dataset content hash" in card and "difforge train --config" in card
    assert (run / "loss.png").is_file() and (run / "samples" / "step-000000006.png").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_dry_run_prints_size_and_cost(workspace, tmp_path):
    result = invoke(
        "train", "--config", workspace / "config.json", "--out", tmp_path / "r", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "parameters" in result.stdout and "MFLOPs per forward" in result.stdout
    assert "24 images" in result.stdout and not (tmp_path / "r").exists()


def test_sample_writes_a_png_with_provenance(workspace, tmp_path):
    out = tmp_path / "grid.png"
    result = invoke(
        "sample", "--model", workspace / "run" / "model", "--sampler", "euler", "--steps", "2",
        "--guidance", "3", "--labels", "0,1,2", "--seed", "5", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 images" in result.stdout
    with Image.open(out) as im:
        text = dict(im.text)
    assert text["synthetic"] == "true" and text["sampler"] == "euler" and text["steps"] == "2"
    assert json.loads(text["seeds"]) == [5, 6, 7] and json.loads(text["labels"]) == [0, 1, 2]
    manifest = json.loads((workspace / "run" / "model" / "manifest.json").read_text())
    assert text["model_sha256"] == manifest["files"]["model.safetensors"]


def test_info(workspace):
    result = invoke("info", "--model", workspace / "run" / "model")
    assert result.exit_code == 0, result.output
    assert "parameters" in result.stdout and "trained 6 steps" in result.stdout
    as_json = json.loads(invoke("info", "--model", workspace / "run" / "model", "--json").stdout)
    assert as_json["num_classes"] == 3 and as_json["parameters"] > 0
    assert as_json["class_names"] == ["a", "b", "c"]  # the image folder's class sub-folders


def test_resume_rules(workspace, tmp_path):
    cfg = workspace / "config.json"
    again = invoke("train", "--config", cfg, "--out", workspace / "run", "--no-progress")
    assert_one_line_error(again, "--resume")
    changed = json.loads(cfg.read_text()) | {"seed": 1}
    (tmp_path / "c.json").write_text(json.dumps(changed))
    refused = invoke(
        "train", "--config", tmp_path / "c.json", "--out", workspace / "run", "--resume"
    )
    assert_one_line_error(refused, "seed: 0 -> 1", "--force")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--labels", "a,b"], ["--labels must be comma-separated integers"]),
        (["--labels", "7"], ["labels.0: must be an integer in [0, 2], got 7"]),
        (["--option", "eta=0.5"], ["options.eta: not an option of sampler"]),
        (["--option", "eta"], ["--option takes KEY=VALUE"]),
        (["--cond", "colour=1"], ["colour: unknown field; conditioning keys: labels"]),
        (["--sampler", "plms"], ["unknown sampler 'plms'", "dpmpp_2m"]),
        (["--grid", "cosine"], ["grid: Input should be", "karras"]),
    ],
)
def test_bad_sample_input_is_one_line(workspace, args, fragments):
    result = invoke("sample", "--model", workspace / "run" / "model", *args)
    assert_one_line_error(result, *fragments)


def test_bad_files_are_one_line(workspace, tmp_path):
    assert_one_line_error(invoke("sample", "--model", tmp_path / "missing"), "model not found")
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    assert_one_line_error(invoke("info", "--model", tmp_path / "model.pt"), "pickle")
    bad = json.loads((workspace / "config.json").read_text()) | {"parameterization": "eps2"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = invoke("train", "--config", tmp_path / "bad.json", "--out", tmp_path / "r")
    assert_one_line_error(result, "parameterization", "'eps', 'x0', 'v', 'velocity' or 'edm'")
    result = invoke("train", "--config", tmp_path / "nope.json", "--out", tmp_path / "r")
    assert_one_line_error(result, "config file not found")
    (tmp_path / "afile").write_text("not a folder")
    model = workspace / "run" / "model"
    result = invoke(
        "sample", "--model", model, "--steps", "1", "--out", tmp_path / "afile" / "g.png"
    )
    assert_one_line_error(result, "afile")


def test_a_second_trainer_on_a_run_folder_is_one_line_naming_the_holder(workspace, tmp_path):
    import os

    from difforge.training.runlock import run_lock

    with run_lock(tmp_path / "run"):
        result = invoke("train", "--config", workspace / "config.json", "--out", tmp_path / "run")
    assert_one_line_error(result, "is in use by another trainer", f"pid {os.getpid()} on ")
