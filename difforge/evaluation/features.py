"""Feature extractors: the networks that define the feature space every metric is computed in.

Inception-v3 weights cannot be fetched everywhere difforge runs, so MNIST gets its own extractor:
a small CNN classifier trained by `scripts/train_feature_net.py` and shipped, with its provenance,
in `models/mnist-features/`. Its 128-d penultimate layer defines "FID-MNIST"; its logits give the
label accuracy of class-conditional samples. Numbers are comparable only between reports that name
the same extractor `name` and weights `sha256`, which is why every report records both.

Any object with `name`, `sha256`, `feature_dim` and `features(x)` is a `FeatureExtractor` (for
example a user's own Inception wrapper); `logits(x)` makes it a `Classifier` as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor, nn

from difforge.core.errors import DifforgeError, InvalidArgumentError
from difforge.pipeline.filters import Classifier  # noqa: F401  (the one classifier protocol)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
README_FILE = "README.md"
FORMAT_VERSION = 1


class WeightsIntegrityError(DifforgeError):
    """A weights folder is incomplete, or a file's sha256 differs from its manifest."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images to feature vectors; `name` and `sha256` identify it in every report.

    `features` takes float32 images in [-1, 1], shape (B, C, H, W), as difforge produces them,
    and returns float features (B, feature_dim). Resizing or channel repeats are its own business.
    `sha256` is the hex digest of its weights file (what `sha256sum` prints).
    """

    name: str
    sha256: str
    feature_dim: int

    def features(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture of the MNIST feature network; stored under "architecture" in config.json."""

    name: str = "difforge-mnist-features-v1"  # recorded in reports next to the weights sha256
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (16, 32, 64)  # one conv3x3-BN-ReLU-maxpool2 stage per entry
    feature_dim: int = 128  # width of the penultimate layer = the FID-MNIST feature space
    num_classes: int = 10
    dropout: float = 0.1  # on the features, before the classifier head; training only

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels or min(self.channels) < 1:
            raise InvalidArgumentError(f"channels must be positive, got {self.channels}")
        if self.image_size >> len(self.channels) < 1:
            raise InvalidArgumentError(
                f"{len(self.channels)} pooling stages do not fit a {self.image_size}px image"
            )
        if self.feature_dim < 1 or self.num_classes < 2:
            raise InvalidArgumentError("feature_dim must be >= 1 and num_classes >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgumentError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict) -> FeatureNetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown feature-net config fields: {', '.join(unknown)}")
        return cls(**d)


class FeatureNet(nn.Module):
    """Small MNIST CNN: conv stages -> flatten -> Linear (features) -> ReLU, dropout -> Linear.

    The features are the penultimate Linear's output before its ReLU, so no unit is dead and the
    feature covariance stays full rank (the FID needs its matrix square root).
    """

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for c_out in config.channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        side = config.image_size >> len(config.channels)  # 28 -> 14 -> 7 -> 3
        self.proj = nn.Linear(c_in * side * side, config.feature_dim)
        self.head = nn.Sequential(
            nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(config.feature_dim, config.num_classes)
        )

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, 28, 28) float in [-1, 1] -> (B, feature_dim)."""
        return self.proj(self.trunk(x).flatten(1))

    def logits(self, x: Tensor) -> Tensor:
        """(B, 1, 28, 28) float in [-1, 1] -> (B, num_classes)."""
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)


class TorchFeatureExtractor:
    """A loaded, frozen `FeatureNet` that satisfies `FeatureExtractor` and `Classifier`.

    Inputs are cast to float32 and run in eval mode under `torch.inference_mode`.
    """

    def __init__(self, net: FeatureNet, sha256: str):
        self.net = net.eval().requires_grad_(False)
        self.name = net.config.name
        self.sha256 = sha256
        self.feature_dim = net.config.feature_dim

    def _check(self, x: Tensor) -> Tensor:
        c, s = self.net.config.in_channels, self.net.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise InvalidArgumentError(f"expected images (B, {c}, {s}, {s}), got {tuple(x.shape)}")
        return x.float()

    def features(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.net.features(self._check(x))

    def logits(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.net.logits(self._check(x))

    def __repr__(self) -> str:
        return f"TorchFeatureExtractor(name={self.name!r}, sha256={self.sha256[:12]}...)"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`, as `sha256sum` prints it."""
    return hashlib.sha256(data).hexdigest()


def default_features_dir() -> Path:
    """The shipped `models/mnist-features/` folder of a source checkout or editable install."""
    return Path(__file__).resolve().parents[2] / "models" / "mnist-features"


def _verified_files(folder: Path) -> dict[str, bytes]:
    """Read every file the manifest lists and check its sha256; returns {name: bytes}."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise WeightsIntegrityError(f"{folder}: no {MANIFEST_FILE}; refusing unverified weights")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsIntegrityError(f"{manifest_path}: not a manifest ({e})") from e
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if required not in files:
            raise WeightsIntegrityError(f"{manifest_path}: does not list {required}")
    contents = {}
    for name, expected in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise WeightsIntegrityError(f"{folder}: manifest lists missing file {name!r}")
        data = path.read_bytes()
        actual = sha256_bytes(data)
        if actual != expected:
            raise WeightsIntegrityError(
                f"{path}: sha256 {actual} does not match the manifest's {expected}"
            )
        contents[name] = data
    return contents


def load_feature_extractor(path: str | Path | None = None) -> TorchFeatureExtractor:
    """Load a feature network folder (safetensors weights + config.json + manifest.json).

    Args:
        path: the folder; default `default_features_dir()`, the network difforge ships.

    Returns:
        A `TorchFeatureExtractor` named by the config, with `sha256` = the weights file's sha256.

    Raises:
        WeightsIntegrityError: a file is missing or its sha256 differs from the manifest.
        DifforgeError: the weights' tensor names or shapes do not match the architecture.
    """
    folder = Path(path) if path is not None else default_features_dir()
    if not folder.is_dir():
        raise DifforgeError(f"feature network folder {folder} not found; pass path=")
    contents = _verified_files(folder)  # hash the bytes we then parse: no check-then-reread gap
    config = json.loads(contents[CONFIG_FILE])
    if config.get("format_version") != FORMAT_VERSION or "architecture" not in config:
        raise DifforgeError(
            f"{folder / CONFIG_FILE}: expected format_version {FORMAT_VERSION} with an "
            f"'architecture' section, got format_version {config.get('format_version')}"
        )
    net = FeatureNet(FeatureNetConfig.from_dict(config["architecture"]))
    state = load_safetensors_bytes(contents[WEIGHTS_FILE])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DifforgeError(f"{folder / WEIGHTS_FILE} does not fit the architecture: {e}") from e
    return TorchFeatureExtractor(net, sha256_bytes(contents[WEIGHTS_FILE]))


def save_feature_net(net: FeatureNet, folder: str | Path, training: dict) -> str:
    """Write model.safetensors, config.json and manifest.json; returns the weights' sha256.

    Args:
        net: the trained network.
        folder: output folder, created if missing.
        training: JSON-able training settings, stored under "training" in config.json.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"name": net.config.name})
    arch = asdict(net.config)
    arch["channels"] = list(arch["channels"])
    config = {"format_version": FORMAT_VERSION, "architecture": arch, "training": training}
    size = net.config.image_size
    config["input"] = {"shape": [net.config.in_channels, size, size], "range": [-1.0, 1.0]}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = {n: sha256_bytes((folder / n).read_bytes()) for n in (WEIGHTS_FILE, CONFIG_FILE)}
    manifest = {"files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return files[WEIGHTS_FILE]


def extract(
    fn: Callable[[Tensor], Tensor], images: Tensor | np.ndarray, *, batch_size: int = 500
) -> np.ndarray:
    """Apply `fn` (e.g. `extractor.features` or `.logits`) in batches; returns float64 (N, D).

    Args:
        fn: maps float32 images in [-1, 1], (B, C, H, W), to (B, D).
        images: uint8 (N, C, H, W) in [0, 255] (mapped to [-1, 1] as x / 127.5 - 1, like
            `ImageDataset.as_float`), or float (N, C, H, W) already in [-1, 1].
        batch_size: images per call; results do not depend on it beyond float rounding.
    """
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[0] == 0:
        raise InvalidArgumentError(f"expected images (N > 0, C, H, W), got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        xb = xb.float().div(127.5).sub(1.0) if xb.dtype == torch.uint8 else xb.float()
        out.append(fn(xb).detach().double().cpu())  # (B, D)
    return torch.cat(out).numpy()
