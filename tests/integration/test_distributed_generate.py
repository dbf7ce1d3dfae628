"""`difforge sample` and `difforge evaluate` under a real torchrun (2 gloo processes): sampler
calls of a fixed --batch-size dealt over the ranks give rank 0 the single-process output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from difforge.cli import app
from difforge.evaluation import against as against_module
from tests.integration.distributed_helpers import torchrun
from tests.integration.test_cli_evaluate import small_mnist
from tests.unit.test_eval_report import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("dist-gen") / "tiny")


def test_two_ranks_write_the_single_process_grid_pixel_for_pixel(model, tmp_path):
    # 7 images in calls of 2: 4 calls, ranks 0 and 1 draw 2 each; the last call has 1 image
    args = ["sample", "--model", model, "--seed", "3", "--steps", "3", "--batch-size", "2"]
    args += ["--labels", "0,1,2,3,4,5,6", "--num-images", "7"]
    one = runner.invoke(app, [*map(str, args), "--out", str(tmp_path / "one.png")])
    assert one.exit_code == 0, one.output
    two = torchrun("-m", "difforge.cli", *args, "--out", tmp_path / "two.png")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 writes and reports
    a, b = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "two.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    differ = {k for k in a.text if a.text[k] != b.text.get(k)}
    assert differ <= {"created"}, differ  # provenance equal but for the time stamp


def test_a_random_seed_is_drawn_once_for_all_ranks(model, tmp_path):
    args = ["sample", "--model", str(model), "--steps", "2", "--batch-size", "1"]
    two = torchrun("-m", "difforge.cli", *args, "--num-images", "2", "--out", tmp_path / "g.png")
    assert two.returncode == 0, two.stderr[-3000:]
    grid = Image.open(tmp_path / "g.png")
    seed = json.loads(grid.text["seeds"])[0]
    again = [*args, "--num-images", "2", "--seed", str(seed), "--out", str(tmp_path / "a.png")]
    one = runner.invoke(app, again)
    assert one.exit_code == 0, one.output
    # image 1 came from rank 1: had it drawn its own seed, it would not be seed + 1's image
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(tmp_path / "a.png")))


def test_two_ranks_evaluate_to_the_single_process_report(model, tmp_path, monkeypatch):
    monkeypatch.setattr(against_module, "load_mnist", small_mnist)
    args = ["evaluate", "--model", str(model), "--steps", "2", "--guidance", "2", "--threads", "1"]
    args += ["--num-images", "150", "--batch-size", "40", "--cache-dir", str(tmp_path / "cache")]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    two = torchrun("tests/integration/small_mnist_cli.py", *args, "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / f"{w}.json").read_text()) for w in ("one", "two"))
    assert r2["metrics"] == r1["metrics"]  # exact: the same images, the same features
    assert [r["label_counts"] for r in r2["repeats"]] == [r["label_counts"] for r in r1["repeats"]]
