"""Train the MNIST feature network that defines FID-MNIST and ship it with its provenance.

    .venv/bin/python scripts/train_feature_net.py --out models/mnist-features

Writes model.safetensors, config.json, manifest.json and README.md (dataset content hashes, test
accuracy, the command, date, weights sha256). Deterministic for a fixed seed, torch version and
thread count: `torch.manual_seed` fixes the initial weights and dropout, and one seeded
generator drives shuffling and augmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from difforge.data.mnist import ImageDataset, load_mnist
from difforge.evaluation.features import (
    README_FILE,
    FeatureNet,
    FeatureNetConfig,
    TorchFeatureExtractor,
    extract,
    load_feature_extractor,
    save_feature_net,
)
from difforge.evaluation.metrics import label_accuracy


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; stored under "training" in config.json."""

    seed: int = 0
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3  # AdamW peak learning rate, cosine-decayed to 0 after the warmup
    warmup_steps: int = 200  # linear warmup from 0 to lr
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    augment: bool = True  # random affine: rotation, scale, shift; see `random_affine`
    max_rotation_deg: float = 10.0
    max_shift_px: float = 2.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    threads: int = 1  # one thread: reproducible anywhere, and no OpenMP spin on shared cores


def random_affine(x: Tensor, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Light augmentation of (B, 1, H, W) images in [-1, 1]; the background stays at -1."""
    b, _, h, _ = x.shape
    u = torch.rand(b, 4, generator=gen) * 2 - 1  # (B, 4) uniform in [-1, 1]
    angle = u[:, 0] * math.radians(cfg.max_rotation_deg)
    lo, hi = cfg.scale_range
    scale = (lo + hi) / 2 + u[:, 1] * (hi - lo) / 2
    shift = u[:, 2:] * (2 * cfg.max_shift_px / h)  # pixels -> affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample in [0, 1] so the zero padding is background, then map back to [-1, 1]
    out = F.grid_sample(
        (x + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out * 2 - 1


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to zero (Loshchilov & Hutter 2017, SGDR Eq. 5)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(net: FeatureNet, data: ImageDataset, cfg: TrainConfig) -> list[float]:
    """AdamW with cross-entropy; returns the mean training loss of each epoch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = data.as_float(), data.labels
    steps_per_epoch = len(data) // cfg.batch_size  # drop the ragged last batch
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, step = [], 0
    net.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(data), generator=gen)
        running, t0 = 0.0, time.perf_counter()
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            if cfg.augment:
                x = random_affine(x, cfg, gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            loss = F.cross_entropy(net(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
        losses.append(running / steps_per_epoch)
        dt = time.perf_counter() - t0
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f} ({dt:.0f} s)", flush=True)
    return losses


def accuracy(extractor: TorchFeatureExtractor, data: ImageDataset) -> float:
    """Top-1 accuracy over a labelled dataset, through the same code path as evaluation."""
    return label_accuracy(extract(extractor.logits, data.images, batch_size=1000), data.labels)


README_TEMPLATE = """# MNIST feature network ({name})

The feature space of difforge's FID-MNIST, KID, precision/recall and diversity numbers, and the
classifier behind label accuracy. Numbers are comparable only between reports that record this
extractor name and weights sha256.

| | |
|---|---|
| weights sha256 (`model.safetensors`) | `{sha256}` |
| test accuracy (MNIST test, 10k images) | **{test_acc:.2%}** |
| train accuracy (no augmentation) | {train_acc:.2%} |
| parameters | {params:,} |
| training time | {train_s:.0f} s wall, {threads} CPU thread(s) on shared cores, {platform} |
| trained on | MNIST train, content hash `{train_hash}` |
| evaluated on | MNIST test, content hash `{test_hash}` |
| date (UTC) | {date} |
| software | torch {torch}, python {python} |

Architecture: {arch}. Features are the {feature_dim}-d output of the penultimate Linear layer,
before its ReLU. Input: float32 images (B, 1, 28, 28) in [-1, 1].

Training settings (also in `config.json` under "training"): {train_cfg}.

## Reproduce

```
{command}
```

The command is deterministic: with the same torch version and thread count it rewrites the same
bytes (same sha256). Other versions or thread counts round differently and give slightly
different weights, hence a different sha256 and a different FID-MNIST. `manifest.json` lists
the sha256 of `model.safetensors` and `config.json`;
`difforge.evaluation.load_feature_extractor` refuses a folder whose files do not match it.
"""


def write_readme(out: Path, facts: dict) -> None:
    (out / README_FILE).write_text(README_TEMPLATE.format(**facts))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/mnist-features", help="output folder")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--no-augment", action="store_true", help="train without random affine")
    cli_args = sys.argv[1:] if argv is None else argv
    args = p.parse_args(cli_args)
    cfg = TrainConfig(
        seed=args.seed, epochs=args.epochs, threads=args.threads, augment=not args.no_augment
    )
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # initial weights
    torch.use_deterministic_algorithms(True)
    train_set, test_set = load_mnist("train"), load_mnist("test")
    net = FeatureNet(FeatureNetConfig())
    t0 = time.perf_counter()
    train(net, train_set, cfg)
    train_s = time.perf_counter() - t0
    out = Path(args.out)
    training = asdict(cfg)  # no timings here: config.json stays identical across reruns
    training["dataset"] = {"name": train_set.name, "content_hash": train_set.content_hash}
    sha = save_feature_net(net, out, training)
    extractor = load_feature_extractor(out)  # evaluate exactly what was shipped
    test_acc = accuracy(extractor, test_set)
    train_acc = accuracy(extractor, train_set)
    print(f"test accuracy {test_acc:.4%}, train accuracy {train_acc:.4%}, {train_s:.0f} s")
    facts = {
        "name": net.config.name,
        "sha256": sha,
        "test_acc": test_acc,
        "train_acc": train_acc,
        "params": sum(p.numel() for p in net.parameters()),
        "train_s": train_s,
        "threads": cfg.threads,
        "platform": f"{platform.system()} {platform.machine()}",
        "train_hash": train_set.content_hash,
        "test_hash": test_set.content_hash,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "arch": repr(net.config),
        "feature_dim": net.config.feature_dim,
        "train_cfg": json.dumps(asdict(cfg)),
        "command": ".venv/bin/python scripts/train_feature_net.py " + shlex.join(cli_args),
    }
    write_readme(out, facts)


if __name__ == "__main__":
    main()
