"""The shipped default model's pixels are pinned: the same request gives the same bytes as wave 1.

The digests were computed with the wave-1 code (commit dbb5040, before the pipeline layer) on this
CPU build of torch; a change here means a request's images changed. One deliberate change: ipndm's
last step to sigma = 0 now returns x0_hat (as ComfyUI does) instead of a 4th-order multistep update,
which the convergence-order test showed costs accuracy (slope 1.35 instead of 2 at 64-128 steps);
its digest is the new code's, every other one is wave 1's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import difforge

MODEL = Path(__file__).resolve().parents[2] / "models" / "mnist-cond"

PINNED = [
    (dict(labels=[0, 1, 2, 3], sampler="dpmpp_2m", steps=20, guidance=3.0, seed=42), "e711742f039dce1a"),
    (dict(labels=[7], n=3, sampler="ipndm", steps=8, seed=5), "439b7d6993851c3c"),  # see above
    (dict(labels=[1, 2], sampler="dpmpp_2m_sde", steps=10, guidance=2.0, seed=9), "6a0b08b9005ad2ba"),
    (dict(labels=[3, 4], sampler="heun", steps=6, seed=1, s_churn=1.0), "c0407cd9a0d4382b"),
]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield difforge.load(MODEL)
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("kwargs", "digest"), PINNED)
def test_default_model_pixels_are_unchanged(model, kwargs, digest):
    images = model.sample(**kwargs).images
    assert hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16] == digest
