"""`difforge export onnx` in-process: the file it writes samples like eager; errors are one line."""

from __future__ import annotations

import pytest

from difforge.cli import main
from difforge.nets.onnx import OPSET, read_metadata
from difforge.pipeline import load, resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_onnx_writes_a_graph_that_samples_like_eager(model_dir, tmp_path, capsys):
    out = tmp_path / "net.onnx"
    with pytest.raises(SystemExit) as e:
        main(["export", "onnx", "--model", str(model_dir), "--out", str(out)])
    assert e.value.code == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: opset {OPSET}, inputs x, c_noise, labels" in said
    model = load(model_dir)
    assert read_metadata(out)["model_sha256"] == model.sha256
    plan = resolve(model, {"n": 2, "seed": 3, "labels": [1, 2]})
    want = model.sample_latents(plan.rows, plan)[0]
    got = model.with_backend("onnxruntime", onnx_path=str(out)).sample_latents(plan.rows, plan)[0]
    assert (got - want).abs().max() <= 1e-4  # the x0-prediction (ModelDenoiser) adapter here


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["export", "onnx", "--model", "/nonexistent/model", "--out", "x.onnx"], "not found"),
        (["export", "onnx", "--out", "x.onnx"], "--model"),
    ],
)
def test_export_errors_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err
    assert not (tmp_path / "x.onnx").exists()
