"""img2img and inpainting through the one resolver: the library, the CLI and replays (tiny 8x8
model); HTTP is tests/integration/test_serving_editing.py."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from difforge.cli import main
from difforge.common.png import png_bytes, png_pixels, png_text
from difforge.pipeline import RequestInvalid, RequestLimits, load, resolve
from difforge.pipeline.editing import latent_mask, pixels_sha256

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)


def digit(seed: int = 0) -> torch.Tensor:
    """A uint8 (1, 8, 8) test image."""
    return torch.randint(0, 256, (1, 8, 8), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def lower_half() -> torch.Tensor:
    m = torch.zeros(8, 8)
    m[4:] = 1  # generate the lower half
    return m


def problems(model, request, limits=None) -> dict[str, str]:
    with pytest.raises(RequestInvalid) as e:
        resolve(model, request, limits)
    return {".".join(map(str, p.loc)): p.kind for p in e.value.problems}


def test_inpainting_keeps_the_known_region_to_the_byte_and_is_batch_invariant(model):
    init = digit()
    a = model.sample(labels=[3, 3, 5], seeds=[4, 5, 6], steps=4, init_image=init, mask=lower_half())
    for img in a.images:
        assert torch.equal(img[:, :4], init[:, :4]), "the kept upper half changed"
    assert not torch.equal(a.images[0][:, 4:], init[:, 4:])
    # other company at the same call shape (a kernel's reduction order may depend on the batch
    # size: serving fixes the shape by padding, tests/integration/test_serving_editing.py)
    other = [digit(7), init, digit(8)]
    b = model.sample(
        labels=[0, 3, 9], seeds=[1, 5, 2], steps=4, init_image=other, mask=lower_half()
    )
    assert torch.equal(b.images[1], a.images[1])
    assert a.edit["mask_sha256"][0] == pixels_sha256((lower_half() * 255).to(torch.uint8)[None])


def test_img2img_strength_sets_how_far_the_output_moves(model):
    init = digit(1)
    dist = []
    for strength in (0.25, 0.5, 1.0):
        s = model.sample(labels=[2] * 4, seed=9, steps=8, init_image=init, strength=strength)
        assert s.nfe == max(1, int(8 * strength))
        dist.append((s.images.float() - init.float()).abs().mean().item())
    assert dist[0] < dist[1] < dist[2], dist


def test_png_base64_and_tensor_inputs_resolve_to_the_same_plan(model):
    init = digit(2)
    png = png_bytes(init)
    by_tensor = resolve(model, {"init_image": init, "seed": 1})
    by_bytes = resolve(model, {"init_image": png, "seed": 1})
    by_text = resolve(model, {"init_image": base64.b64encode(png).decode(), "seed": 1})
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    by_url = resolve(model, {"init_image": url, "seed": 1})
    assert by_tensor.params() == by_bytes.params() == by_text.params() == by_url.params()
    assert by_tensor.params()["init_image_sha256"] == [pixels_sha256(init)]
    assert by_tensor.params()["strength"] == 0.8
    batched = resolve(model, {"init_image": torch.stack([init, digit(9)]), "seed": 1})
    assert batched.edit.init_sha256 == (pixels_sha256(init), pixels_sha256(digit(9)))
    # an RGB PNG becomes grey for a grey model
    rgb = Image.fromarray(np.repeat(init[0].numpy()[..., None], 3, 2), "RGB")
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    assert resolve(model, {"init_image": buf.getvalue()}).edit.init_sha256 == (pixels_sha256(init),)


def test_params_replay_with_the_images_put_back_and_hashes_are_checked(model):
    init, mask = digit(3), lower_half()
    plan = resolve(model, {"init_image": init, "mask": mask, "seed": 2, "resample": [2, 2]})
    params = plan.params()
    assert params["resample"] == [2, 2] and params["strength"] == 1.0
    replay = resolve(model, {**params, "init_image": png_bytes(init), "mask": mask})
    assert replay.params() == params
    other = {**params, "init_image": digit(4), "mask": mask}
    assert problems(model, other) == {"init_image_sha256.0": "mismatch"}


def test_mask_thresholds_and_follows_the_latent_grid():
    soft = torch.tensor([[0.2, 0.6], [0.5, 0.49]])
    from difforge.pipeline.editing import _mask

    out = _mask(soft, ("mask",), (1, 2, 2), None, [])
    assert out.tolist() == [[[0, 255], [255, 0]]]
    pix = torch.zeros(1, 1, 8, 8)
    pix[..., 3, 5] = 1  # one generated pixel: its whole 4x4 latent cell is generated
    lat = latent_mask(pix, (2, 2))
    assert lat.tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]
    with pytest.raises(ValueError):
        latent_mask(pix, (3, 3))


def test_bad_edit_inputs_name_their_fields(model):
    big = Image.new("L", (16, 16))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    assert problems(model, {"init_image": buf.getvalue()}) == {"init_image": "wrong_size"}
    assert problems(model, {"init_image": "not base64!"}) == {"init_image": "value_error"}
    assert problems(model, {"init_image": base64.b64encode(b"GIF89a").decode()}) == {
        "init_image": "value_error"
    }
    assert problems(model, {"init_image": torch.zeros(1, 8, 8)}) == {"init_image": "type"}
    assert problems(model, {"mask": lower_half()}) == {"mask": "conflict"}
    assert problems(model, {"strength": 0.5}) == {"strength": "conflict"}
    assert problems(model, {"init_image": digit(), "strength": 0}) == {"strength": "range"}
    assert problems(model, {"init_image": digit(), "resample": [2, 2]}) == {"resample": "conflict"}
    assert problems(model, {"init_image": [digit()] * 2, "n": 3}) == {"init_image": "value_error"}
    assert problems(model, {"init_image": digit(), "mask": torch.ones(7, 7)}) == {
        "mask": "wrong_size"
    }
    limits = RequestLimits(max_image_bytes=64)
    assert problems(model, {"init_image": png_bytes(digit())}, limits) == {
        "init_image": "too_large"
    }


def test_a_decode_bomb_is_refused_from_its_header(model):
    """A 20000x20000 PNG compresses to a few hundred KB; its size is refused before decoding."""
    data = png_bytes(torch.zeros(1, 2000, 2000, dtype=torch.uint8))  # ~4 MB of pixels, ~4 KB
    assert len(data) < 20_000
    assert problems(model, {"init_image": data}) == {"init_image": "wrong_size"}


def test_cli_sample_edits_an_image_with_provenance(model_dir, tmp_path, capsys):
    init, mask = digit(5), (lower_half() * 255).to(torch.uint8)[None]
    (tmp_path / "in.png").write_bytes(png_bytes(init))
    (tmp_path / "mask.png").write_bytes(png_bytes(mask))
    out = tmp_path / "out.png"
    argv = ["sample", "--model", str(model_dir), "--labels", "1", "--seed", "3", "--steps", "4"]
    argv += ["--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out), "--resample", "2,2"])
    assert e.value.code == 0
    edit = json.loads(png_text(out.read_bytes())["edit"])
    assert edit["init_image_sha256"] == [pixels_sha256(init)]
    assert edit["mask_sha256"] == [pixels_sha256(mask)] and edit["resample"] == [2, 2]
    assert png_pixels(out.read_bytes()).ndim == 3  # a captioned grid
    with pytest.raises(SystemExit) as e:
        main([*argv[:-4], "--init-image", str(tmp_path / "in.png"), "--strength", "1.5"])
    assert e.value.code == 2
    assert "strength: must be in (0, 1]" in capsys.readouterr().err


def test_latent_models_edit_in_latent_space_with_the_mask_pooled(tmp_path):
    """A 16x16 pixel model with 8x8 latents: the init image is encoded, the mask max-pooled."""
    from tests.integration.test_pipeline_components import make_tiny_pipeline

    m = load(make_tiny_pipeline(tmp_path / "toy"))
    init = torch.randint(0, 256, (1, 16, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(16, 16)
    mask[9:] = 1  # pixel rows 9..15: latent rows 4..7 (row 4 holds pixel rows 8 and 9)
    plan = resolve(m, {"init_image": init.to(torch.uint8), "mask": mask, "seeds": [1, 2]})
    seen = []
    latents, _ = m.sample_latents(plan.rows, plan, callback=lambda info: seen.append(info.x))
    z0 = m.encode(plan.edit.rows[0].image[None])  # (1, 2, 8, 8)
    assert latents.shape == (2, 2, 8, 8)
    assert torch.equal(latents[0, :, :4], z0[0, :, :4]), "kept latent rows are the init's"
    assert not torch.allclose(latents[0, :, 4:], z0[0, :, 4:])
    alone, _ = m.sample_latents(plan.rows[1:], plan, seeds=[2], edit=_only(plan.edit, 1))
    torch.testing.assert_close(alone[0], latents[1], rtol=0, atol=1e-5)  # batch-size kernels


def _only(edit, i):
    from dataclasses import replace

    return replace(edit, rows=edit.rows[i : i + 1])
