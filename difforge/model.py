"""Model artifacts: a folder that rebuilds a trained denoiser exactly, and nothing else.

    MODEL/
      config.json        ModelConfig: net kind + config, process, parameterization, classes, shape
      model.safetensors  the EMA weights of the network (safetensors only; pickles are refused)
      README.md          model card: provenance, training config, the command that reproduces it
      manifest.json      sha256 of every other file; checked before anything is loaded

`load(path)` verifies the manifest, rebuilds the network from config.json, loads the weights
strictly (missing, unexpected or misshapen tensors are listed, never silently initialised) and
wraps the net in its denoiser adapter. `Model.sample` draws seeded images; `save_grid_png` writes
them as a labelled grid with provenance in PNG text chunks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difforge.core.denoiser import EDMPrecond, ModelDenoiser
from difforge.core.errors import DifforgeError, InvalidArgumentError, check_choice
from difforge.core.processes import NoiseProcess, make_process
from difforge.core.sigmas import get_sigmas

FORMAT = "difforge-model/1"
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, MANIFEST_FILE = (
    "config.json",
    "model.safetensors",
    "README.md",
    "manifest.json",
)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class ModelIntegrityError(DifforgeError):
    """A model folder is incomplete, corrupted, unsafe or does not match its network."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NetSpec(_Frozen):
    """Which network to build: `difforge.nets.build_net(kind, config)`."""

    kind: str = "unet"
    config: dict[str, Any] = Field(default_factory=dict)  # the net's own config, as JSON

    @model_validator(mode="after")
    def _complete(self) -> NetSpec:
        # Validate against the net's own config class and store every field, defaults included,
        # so two specs that build the same net compare equal.
        from difforge.nets import net_config_from_dict

        full = net_config_from_dict(self.kind, self.config).to_dict()
        object.__setattr__(self, "config", full)
        return self


class SamplingDefaults(_Frozen):
    """How a model samples unless told otherwise."""

    sampler: str = "dpmpp_2m"  # a name in difforge.samplers.SAMPLERS
    steps: int = Field(20, ge=1)
    guidance: float = 3.0  # classifier-free guidance scale; 1 = plain conditional
    grid: Literal["karras", "exponential", "uniform"] = "karras"

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        from difforge.samplers import SAMPLERS

        check_choice("sampler", v, SAMPLERS)
        return v


class ModelConfig(_Frozen):
    """Everything needed to rebuild a trained network and its denoiser adapter."""

    format: Literal["difforge-model/1"] = FORMAT
    name: str
    net: NetSpec
    process: dict[str, Any]  # `make_process` dict
    parameterization: Literal["eps", "x0", "v", "velocity", "edm"]
    sigma_data: float = Field(0.5, gt=0)  # EDM preconditioning only
    time_scale: float = Field(1.0, gt=0)  # ModelDenoiser's time input multiplier
    num_classes: int = Field(0, ge=0)  # 0: unconditional; label num_classes = the null class
    image_shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...] = ()  # the name of each label, when the dataset has them
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    provenance: dict[str, Any] = Field(default_factory=dict)  # informational, not used to rebuild


def build_network(spec: NetSpec) -> nn.Module:
    """The network `spec` names, randomly initialised (from the global torch RNG)."""
    from difforge.nets import build_net

    return build_net(spec.kind, spec.config)


def build_denoiser(config: ModelConfig, net: nn.Module) -> nn.Module:
    """Wrap `net` in the adapter its parameterization needs (one place knows the prediction)."""
    if config.parameterization == "edm":
        return EDMPrecond(net, config.sigma_data)
    return ModelDenoiser(
        net, make_process(config.process), config.parameterization, time_scale=config.time_scale
    )


def network_cost(net: nn.Module, image_shape: Sequence[int], num_classes: int) -> tuple[int, int]:
    """(parameter count, FLOPs of one forward pass on one image) of a difforge net."""
    from difforge.nets import count_parameters, flops_per_forward

    x = torch.zeros(1, *image_shape)  # (1, C, H, W)
    cond = {"labels": torch.zeros(1, dtype=torch.int64)} if num_classes else None
    return count_parameters(net), flops_per_forward(net, x, torch.zeros(1), cond)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """The git commit of the difforge source tree (with '-dirty' if modified), or 'unknown'."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_model(
    folder: str | Path, config: ModelConfig, weights: Mapping[str, Tensor], card: str
) -> Path:
    """Write a model folder atomically (temp folder, fsync, rename) and return its path.

    Args:
        folder: destination; an existing model there is replaced.
        config: the ModelConfig written as config.json.
        weights: the network's state dict (EMA weights), float tensors.
        card: the README.md model card text.
    """
    folder = Path(folder)
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelIntegrityError(f"refusing to save non-finite weights: {', '.join(bad[:5])}")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    _write_text(tmp / CONFIG_FILE, json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    _write_text(tmp / CARD_FILE, card)
    os.chmod(tmp / WEIGHTS_FILE, (tmp / CARD_FILE).stat().st_mode & 0o777)  # safetensors: 0600
    with open(tmp / WEIGHTS_FILE, "rb+") as f:
        os.fsync(f.fileno())
    files = {n: sha256_file(tmp / n) for n in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)}
    manifest = {"format": FORMAT, "files": files}
    _write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    _fsync_dir(tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)
    _fsync_dir(folder.parent)
    return folder


def _model_folder(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelIntegrityError(
            f"refusing to load {p.name}: pickle checkpoints can run arbitrary code; "
            "difforge loads safetensors model folders only"
        )
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    if p.is_file():
        if p.name not in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, CARD_FILE):
            raise ModelIntegrityError(f"{p} is not a difforge model folder")
        p = p.parent
    if not (p / WEIGHTS_FILE).is_file():
        pickles = sorted(q.name for q in p.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelIntegrityError(
                f"refusing to load {p}: it holds pickle weights ({', '.join(pickles)}), "
                f"not {WEIGHTS_FILE}; difforge loads safetensors only"
            )
        raise ModelIntegrityError(f"{p} is not a difforge model folder (no {WEIGHTS_FILE})")
    return p


def verify_manifest(folder: Path) -> dict[str, str]:
    """Check every file against manifest.json; returns {file name: sha256}."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = dict(manifest["files"])
    except FileNotFoundError:
        raise ModelIntegrityError(f"{folder}: no {MANIFEST_FILE}; not a complete model") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ModelIntegrityError(f"{folder}/{MANIFEST_FILE} is not a valid manifest") from None
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files:
            raise ModelIntegrityError(f"{folder}/{MANIFEST_FILE} does not list {required}")
    for name, digest in files.items():
        if Path(name).name != name:
            raise ModelIntegrityError(f"{folder}/{MANIFEST_FILE}: bad file name {name!r}")
        if not (folder / name).is_file():
            raise ModelIntegrityError(f"{folder}: {name} is listed in the manifest but missing")
        actual = sha256_file(folder / name)
        if actual != digest:
            raise ModelIntegrityError(
                f"{folder}/{name} is corrupted or was modified: sha256 {actual[:12]}... "
                f"does not match the manifest's {str(digest)[:12]}..."
            )
    return files


def _read_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.model_validate_json((folder / CONFIG_FILE).read_text())
    except ValidationError as e:
        where = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()
        )
        raise ModelIntegrityError(f"{folder}/{CONFIG_FILE}: {where}") from None


def _list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_weights_strict(net: nn.Module, tensors: Mapping[str, Tensor], source: str) -> None:
    """Load `tensors` into `net`, or raise listing every missing, unexpected or misshapen key."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (file vs net): {_list(shapes)}")
    if problems:
        raise ModelIntegrityError(f"{source} does not match the network: " + "; ".join(problems))
    nonfinite = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if nonfinite:
        raise ModelIntegrityError(f"{source} has non-finite weights: {_list(nonfinite)}")
    net.load_state_dict(dict(tensors), strict=True)


@dataclass(frozen=True)
class Samples:
    """Images drawn by `Model.sample`, with what is needed to draw them again."""

    images: Tensor  # uint8 (n, C, H, W)
    labels: tuple[int, ...] | None
    seeds: tuple[int, ...]
    nfe: int
    sampler: str
    steps: int
    guidance: float
    grid: str


def to_uint8(x: Tensor) -> Tensor:
    """Data-space images in [-1, 1] -> uint8 in [0, 255], same shape."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class Model:
    """A loaded model: its config, the sha256 of its weights, and its denoiser (eval, no grad).

    Use `difforge.load(path)` to get one.
    """

    def __init__(self, config: ModelConfig, net: nn.Module, sha256: str, path: Path | None = None):
        self.config = config
        self.name = config.name
        self.sha256 = sha256
        self.path = path
        self.num_classes = config.num_classes
        self.image_shape = tuple(config.image_shape)
        self.process: NoiseProcess = make_process(config.process)
        net.eval().requires_grad_(False)
        self.net = net
        self.denoiser = build_denoiser(config, net).eval()

    def __repr__(self) -> str:
        return (
            f"Model(name={self.name!r}, sha256={self.sha256[:12]}..., classes={self.num_classes})"
        )

    def sample(
        self,
        labels: Sequence[int] | None = None,
        n: int | None = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 42,
        seeds: Sequence[int] | None = None,
        grid: str | None = None,
        **knobs,
    ) -> Samples:
        """Draw n images; image i depends only on (seeds[i], labels[i]) and the settings.

        Args:
            labels: one class per image (or one class for all n); default cycles 0..classes-1.
            n: number of images; default len(labels), len(seeds), or 16.
            sampler, steps, guidance, grid: default to the model's `sampling` settings.
            seed: image i uses seed + i, unless `seeds` gives one seed per image.
            **knobs: sampler-specific options (e.g. eta for ddim).

        Returns:
            Samples with uint8 images (n, C, H, W), the labels, seeds and NFE used.
        """
        from difforge.samplers import sample

        d = self.config.sampling
        sampler = d.sampler if sampler is None else sampler
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else float(guidance)
        grid = d.grid if grid is None else grid
        labels, seeds = self._labels_and_seeds(labels, n, seed, seeds)
        cond = uncond = None
        if labels is not None:
            cond = {"labels": torch.tensor(labels, dtype=torch.int64)}
            uncond = {"labels": torch.full((len(labels),), self.num_classes, dtype=torch.int64)}
        else:
            guidance = 1.0
        sigmas = get_sigmas(grid, steps, process=self.process)
        res = sample(
            self.denoiser,
            sigmas,
            shape=self.image_shape,
            seeds=seeds,
            sampler=sampler,
            cond=cond,
            uncond=uncond,
            guidance=guidance,
            **knobs,
        )
        lab = None if labels is None else tuple(labels)
        return Samples(
            to_uint8(res.x), lab, tuple(res.seeds), res.nfe, sampler, steps, guidance, grid
        )

    def _labels_and_seeds(self, labels, n, seed, seeds) -> tuple[list[int] | None, list[int]]:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidArgumentError(f"n must be a positive integer, got {n!r}")
        count = n or (len(labels) if labels else None) or (len(seeds) if seeds else None) or 16
        if seeds is None:
            seeds = [seed + i for i in range(count)]
        elif len(seeds) != count:
            raise InvalidArgumentError(f"got {len(seeds)} seeds for {count} images")
        if self.num_classes == 0:
            if labels:
                raise InvalidArgumentError(f"model {self.name!r} is unconditional: no labels")
            return None, list(seeds)
        labels = list(labels) if labels else [i % self.num_classes for i in range(count)]
        if len(labels) == 1:
            labels = labels * count
        if len(labels) != count:
            raise InvalidArgumentError(f"got {len(labels)} labels for {count} images")
        for lab in labels:
            if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < self.num_classes:
                raise InvalidArgumentError(
                    f"labels must be integers in [0, {self.num_classes - 1}], got {lab!r}"
                )
        return labels, list(seeds)

    def summary(self) -> dict[str, Any]:
        """What `difforge info` prints: identity, shape, cost, sampling defaults, provenance."""
        params, flops = network_cost(self.net, self.image_shape, self.num_classes)
        c = self.config
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "num_classes": self.num_classes,
            "class_names": list(c.class_names),
            "image_shape": list(self.image_shape),
            "net": c.net.kind,
            "parameters": params,
            "flops_per_forward": flops,
            "parameterization": c.parameterization,
            "process": c.process,
            "sampling": c.sampling.model_dump(),
            "provenance": c.provenance,
        }

    def grid_metadata(self, samples: Samples) -> dict[str, str]:
        """PNG text chunks recording where a grid of `samples` came from."""
        return {
            "model": self.name,
            "model_sha256": self.sha256,
            "sampler": samples.sampler,
            "steps": str(samples.steps),
            "guidance": repr(samples.guidance),
            "grid": samples.grid,
            "seeds": json.dumps(list(samples.seeds)),
            "labels": json.dumps(None if samples.labels is None else list(samples.labels)),
            "nfe": str(samples.nfe),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "synthetic": "true",
            "software": "difforge",
        }


def load(path: str | Path) -> Model:
    """Load a model folder written by `save_model` (safetensors only, manifest-checked, strict).

    Args:
        path: the model folder (or a file inside it).

    Returns:
        A Model whose `denoiser` wraps the EMA network, in eval mode.
    """
    folder = _model_folder(path)
    files = verify_manifest(folder)
    config = _read_config(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise ModelIntegrityError(f"{folder}/{WEIGHTS_FILE} is unreadable: {e}") from None
    with torch.random.fork_rng(devices=[]):
        net = build_network(config.net)  # random init is overwritten: don't consume the RNG
    load_weights_strict(net, tensors, f"{folder}/{WEIGHTS_FILE}")
    return Model(config, net, files[WEIGHTS_FILE], folder)


def save_grid_png(
    path: str | Path,
    images: Tensor,
    *,
    captions: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    nrow: int | None = None,
    min_tile: int = 56,
) -> Path:
    """Tile uint8 images (n, C, H, W) into one PNG, a caption above each, metadata as text chunks.

    Args:
        path: output file.
        images: uint8 (n, 1 or 3, H, W).
        captions: one short string per image (e.g. its label), or None.
        metadata: PNG tEXt chunks (provenance).
        nrow: images per row; default ceil(sqrt(n)).
        min_tile: small images are upscaled (nearest) to at least this many pixels.
    """
    from PIL import Image, ImageDraw, PngImagePlugin

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InvalidArgumentError("images must be uint8 (n, 1 or 3, H, W)")
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    scale = max(1, math.ceil(min_tile / min(h, w)))
    th, tw, cap, pad = h * scale, w * scale, (12 if captions else 0), 2
    rows = math.ceil(n / nrow)
    canvas = Image.new("RGB", (nrow * (tw + pad) + pad, rows * (th + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    arr = images.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous().numpy()  # (n, H, W, 3)
    for i in range(n):
        x, y = pad + (i % nrow) * (tw + pad), pad + (i // nrow) * (th + cap + pad)
        tile = Image.fromarray(arr[i], "RGB").resize((tw, th), Image.NEAREST)
        canvas.paste(tile, (x, y + cap))
        if captions:
            draw.text((x + 1, y), str(captions[i]), fill="black")
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=info)
    return path


def save_samples_png(model: Model, samples: Samples, path: str | Path) -> Path:
    """A labelled grid of `samples` with the model's provenance in its text chunks."""
    names = model.config.class_names
    captions = None
    if samples.labels is not None:
        captions = [names[lab] if lab < len(names) else str(lab) for lab in samples.labels]
    nrow = min(len(samples.seeds), max(model.num_classes, 1)) if samples.labels else None
    return save_grid_png(
        path, samples.images, captions=captions, metadata=model.grid_metadata(samples), nrow=nrow
    )
