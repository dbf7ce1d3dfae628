"""Evaluation in scene space: the shipped MNIST feature net applied per quadrant.

A 64x64 scene is four 32x32 quadrants; each is normalised the way MNIST was (ink bounding box
to 20x20, centred by centre of mass in 28x28) and fed to the MNIST feature net (`models/mnist-features`). The scene feature is the concatenation of the
four 128-d quadrant features (512-d): "FID-scenes" is the Frechet distance in that space. A
quadrant is "empty" when fewer than `EMPTY_PIXELS` of its pixels are brighter than mid-gray;
otherwise its digit is the classifier's argmax. Slot accuracy compares these per-quadrant
predictions with the requested slots (an empty request must come out empty).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from difforge.data.scenes import EMPTY, SLOTS, quadrants
from difforge.evaluation.features import TorchFeatureExtractor, load_feature_extractor
from difforge.evaluation.metrics import fid

EMPTY_PIXELS = 12  # bright pixels (> 127 of 255) a quadrant needs to count as holding a digit


def _to_float(images: Tensor) -> Tensor:
    return images.float().div(127.5).sub(1.0) if images.dtype == torch.uint8 else images.float()


def _normalize(q: Tensor) -> Tensor:
    """One quadrant (1, 32, 32) in [-1, 1] -> (1, 28, 28) as MNIST was made (LeCun et al. 1998):
    the ink's bounding box scaled to fit 20x20, centred by its centre of mass in 28x28."""
    ink = (q[0] + 1) / 2  # (32, 32) in [0, 1]
    rows, cols = (ink > 0.2).any(1).nonzero(), (ink > 0.2).any(0).nonzero()
    if len(rows) == 0:
        return torch.full((1, 28, 28), -1.0)
    box = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = box.shape
    s = 20 / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    box = F.interpolate(box[None, None], size=size, mode="bilinear", antialias=True)[0, 0]
    out = torch.zeros(28, 28)
    mass = box.sum().clamp_min(1e-6)
    cy = (box.sum(1) * torch.arange(size[0])).sum() / mass
    cx = (box.sum(0) * torch.arange(size[1])).sum() / mass
    top = int(min(max(round(14 - float(cy)), 0), 28 - size[0]))
    left = int(min(max(round(14 - float(cx)), 0), 28 - size[1]))
    out[top : top + size[0], left : left + size[1]] = box
    return (out * 2 - 1)[None]


def quadrant_digits(images: Tensor) -> Tensor:
    """(B, 1, 64, 64) uint8 or float in [-1, 1] -> (B * 4, 1, 28, 28) float in [-1, 1]."""
    q = quadrants(_to_float(images))  # (B, 4, 1, 32, 32)
    return torch.stack([_normalize(x) for x in q.reshape(-1, 1, q.shape[-2], q.shape[-1])])


def _batched(fn: Callable[[Tensor], Tensor], images: Tensor, batch: int = 250) -> Tensor:
    return torch.cat([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


def scene_features(extractor: TorchFeatureExtractor, images: Tensor) -> np.ndarray:
    """(N, 1, 64, 64) -> float64 (N, 4 * feature_dim): per-quadrant features, concatenated."""
    feats = _batched(lambda x: extractor.features(quadrant_digits(x)), images)  # (N*4, D)
    return feats.reshape(len(images), -1).double().numpy()


def predict_slots(extractor: TorchFeatureExtractor, images: Tensor) -> Tensor:
    """(N, 1, 64, 64) -> (N, 4) int64: each quadrant's digit, or EMPTY (10)."""
    logits = _batched(lambda x: extractor.logits(quadrant_digits(x)), images)  # (N*4, 10)
    pred = logits.argmax(1).reshape(len(images), SLOTS)
    bright = (quadrants(_to_float(images)) > 0).flatten(2).sum(2)  # (N, 4)
    return torch.where(bright < EMPTY_PIXELS, torch.full_like(pred, EMPTY), pred)


def slot_accuracy(pred: Tensor, slots: Tensor) -> dict[str, float]:
    """Per-slot and per-scene agreement of predicted and requested slots, (N, 4) each.

    digit_accuracy: over requested digits, the fraction predicted as that digit in its quadrant;
    empty_accuracy: over requested empty quadrants, the fraction that came out empty;
    slot_accuracy: over all slots; scene_accuracy: scenes with all four slots right.
    """
    right = pred == slots  # (N, 4)
    digit = slots != EMPTY
    return {
        "slot_accuracy": float(right.float().mean()),
        "digit_accuracy": float(right[digit].float().mean()) if digit.any() else math.nan,
        "empty_accuracy": float(right[~digit].float().mean()) if (~digit).any() else math.nan,
        "scene_accuracy": float(right.all(1).float().mean()),
        "n_scenes": len(slots),
        "n_digits": int(digit.sum()),
    }


def psnr(x: Tensor, y: Tensor) -> float:
    """Mean PSNR in dB of images x vs y, both uint8 (N, C, H, W) (peak 255)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (N,)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def reconstruction_report(
    vae_config, vae, dataset, *, n: int | None = None, extractor=None
) -> dict[str, Any]:
    """PSNR, rFID (FID-scenes of reconstructions vs originals) and slot accuracy on `dataset`.

    Args:
        vae_config: its VAEConfig; vae: the Autoencoder; dataset: a SceneDataset (held out).
        n: the first n scenes (default all).
        extractor: default the shipped MNIST feature net.
    """
    from difforge.pipeline.model import to_uint8

    extractor = extractor or load_feature_extractor()
    n = len(dataset) if n is None else min(n, len(dataset))
    x, slots = dataset.images[:n], dataset.slots[:n]
    with torch.no_grad():
        rec = _batched(lambda b: to_uint8(vae.decode(vae.encode(_to_float(b))[0])), x)
    original = slot_accuracy(predict_slots(extractor, x), slots)
    recon = slot_accuracy(predict_slots(extractor, rec), slots)
    return {
        "n": n,
        "psnr_db": psnr(rec, x),
        "rfid_scenes": fid(scene_features(extractor, rec), scene_features(extractor, x)),
        "reconstructed": recon,
        "originals": original,  # the classifier's own accuracy on the real scenes: the ceiling
        "feature_net": {"name": extractor.name, "sha256": extractor.sha256},
        "vae_scaling_factor": vae_config.scaling_factor,
    }


def judge_clauses(
    extractor: TorchFeatureExtractor,
    images: Tensor,
    clauses: list,
    thresholds: Any,
    detail: bool = False,
) -> list:
    """Per scene: does every stated fact hold? The one judge of scene prompts.

    Args:
        extractor: the MNIST classifier (per quadrant, via `predict_slots`).
        images: uint8 (N, 1, 64, 64).
        clauses: per scene, its `difforge.data.scene_captions.Clause`s.
        thresholds: the `SceneThresholds` the captions were made with (ink measurements per
            quadrant, `quadrant_labels`, for thickness and size).
        detail: return {"all": the verdict, "stated": the verdict without the rule that
            unmentioned quadrants are empty} per scene instead of the verdict alone.
    """
    from difforge.data.scene_captions import facts_hold, quadrant_labels

    pred = predict_slots(extractor, images).tolist()  # (N, 4)
    labels = quadrant_labels(images, thresholds)
    out = []
    for c, p, lab in zip(clauses, pred, labels, strict=True):
        verdict = facts_hold(c, p, lab)
        out.append({"all": verdict, "stated": facts_hold(c, p, lab, False)} if detail else verdict)
    return out
