"""`difforge upscale` and `difforge sample` / `info` on a cascade (tiny random models, in-process):
the output PNGs are the library's bytes with provenance; errors are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difforge.cli import main
from difforge.common.png import png_bytes, png_pixels, png_text
from difforge.pipeline import load
from tests.upscale_fixtures import low_res_images, make_tiny_cascade

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_tiny_cascade(tmp_path_factory.mktemp("cli-sr"))


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_upscale_writes_the_library_bytes_with_provenance(folders, tmp_path, capsys):
    cascade, _, up = folders
    imgs = low_res_images(2, seed=5)
    for i, img in enumerate(imgs):
        (tmp_path / f"in{i}.png").write_bytes(png_bytes(img))
    code, out, err = run(
        ["upscale", "--model", str(up), "--image", str(tmp_path / "in0.png"),
         "--image", str(tmp_path / "in1.png"), "--out", str(tmp_path / "o.png"), "--seed", "4"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "2 image(s) at 16x16" in out
    want = load(up).upscale(imgs, seed=4).images
    for i in range(2):
        data = (tmp_path / f"o-{i}.png").read_bytes()
        assert np.array_equal(png_pixels(data).reshape(16, 16), want[i, 0].numpy())
        meta = png_text(data)
        assert json.loads(meta["seeds"]) == [4 + i] and meta["synthetic"] == "true"
        assert json.loads(meta["conditioning"])["low_res"][i]["level"] == 0.1
    # a cascade folder upscales with its upsampler stage (at the cascade's recorded settings)
    code, out, err = run(
        ["upscale", "--model", str(cascade), "--image", str(tmp_path / "in0.png"),
         "--out", str(tmp_path / "c.png"), "--seed", "4"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "c.png").is_file()


def test_upscale_errors_are_one_line(folders, tmp_path, capsys):
    _, base, up = folders
    (tmp_path / "big.png").write_bytes(png_bytes(torch.zeros(1, 16, 16, dtype=torch.uint8)))
    cases = [
        (["--model", str(up), "--image", str(tmp_path / "none.png")], "no such file"),
        (
            ["--model", str(up), "--image", str(tmp_path / "big.png")],
            "is 16x16; the model takes 8x8",
        ),
        (["--model", str(base), "--image", str(tmp_path / "big.png")], "not an upsampler"),
    ]
    for argv, needle in cases:
        code, _, err = run(["upscale", *argv, "--out", str(tmp_path / "x.png")], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_sample_and_info_on_a_cascade(folders, tmp_path, capsys):
    _, base, up = folders
    cascade = tmp_path / "built"
    code, out, err = run(
        ["cascade", "--base", str(base), "--upsampler", str(up), "--out", str(cascade),
         "--steps", "2", "--level", "0.2"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert load(cascade).summary()["upsampler_sampling"]["level"] == 0.2
    code, out, err = run(
        ["sample", "--model", str(cascade), "--labels", "1,2", "--seed", "3",
         "--out", str(tmp_path / "grid.png")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    meta = png_text((tmp_path / "grid.png").read_bytes())
    assert meta["model_sha256"] == load(cascade).sha256
    want = load(cascade).sample(labels=[1, 2], seed=3)
    assert int(meta["nfe"]) == want.nfe
    code, out, err = run(["info", "--model", str(cascade)], capsys)
    assert code == 0, err
    assert "difforge-cascade/1" in out and "component upsampler" in out
