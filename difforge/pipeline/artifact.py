"""Model folders on disk: writing them atomically, verifying every file, loading components strictly.

    v1 (one denoiser)                 v2 (a pipeline of components)
    MODEL/                            MODEL/
      config.json   ModelConfig         pipeline.json  PipelineConfig (components, conditioning)
      model.safetensors                 denoiser/{config.json, model.safetensors}
      README.md                         vae/{config.json, model.safetensors}      (optional)
      manifest.json                     README.md
                                        manifest.json  sha256 of every other file, sub-folders too

The manifest is checked before anything is read; weights are safetensors only (pickles are
refused); each component loads strictly (missing, unexpected or misshapen tensors are listed); a
component whose recorded base hash does not match the component present is refused, naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difforge.common.atomic import atomic_folder
from difforge.core.errors import DifforgeError
from difforge.pipeline.config import (
    FORMAT_V1,
    FORMAT_V2,
    ComponentRef,
    LayoutConfig,
    ModelConfig,
    PipelineConfig,
    VAEConfig,
)

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, MANIFEST_FILE = (
    "config.json",
    "model.safetensors",
    "README.md",
    "manifest.json",
)
PIPELINE_FILE = "pipeline.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
COMPONENT_CONFIGS: dict[str, type[BaseModel]] = {
    "denoiser": ModelConfig,
    "vae": VAEConfig,
    "layout": LayoutConfig,
}


class ModelIntegrityError(DifforgeError):
    """A model folder is incomplete, corrupted, unsafe or does not match its network."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """The git commit of the difforge source tree (with '-dirty' if modified), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
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


# --- writing -------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)  # fsynced by atomic_folder before the folder is published


def _write_json(path: Path, config: BaseModel) -> None:
    _write_text(path, json.dumps(config.model_dump(mode="json"), indent=2) + "\n")


def _write_weights(path: Path, weights: Mapping[str, Tensor], fmt: str) -> None:
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelIntegrityError(f"refusing to save non-finite weights: {', '.join(bad[:5])}")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    save_file(tensors, str(path), metadata={"format": fmt})
    os.chmod(path, 0o644)  # safetensors writes 0600; the rest of a model folder is 0644


def _write_manifest(tmp: Path, fmt: str | None = None) -> None:
    """manifest.json: the sha256 of every other file in the folder, sub-folders included."""
    files = {
        p.relative_to(tmp).as_posix(): sha256_file(p)
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    fmt = fmt or (FORMAT_V2 if (tmp / PIPELINE_FILE).exists() else FORMAT_V1)
    _write_text(tmp / MANIFEST_FILE, json.dumps({"format": fmt, "files": files}, indent=2) + "\n")


def _temp(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.tmp-{os.getpid()}")


def save_model(
    folder: str | Path,
    config: ModelConfig,
    weights: Mapping[str, Tensor],
    card: str,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write a v1 model folder (one denoiser) atomically and return its path.

    Args:
        folder: destination; an existing model there is replaced.
        config: the ModelConfig written as config.json.
        weights: the network's state dict (EMA weights), float tensors.
        card: the README.md model card text.
        extra: further text files {name: text} (e.g. an eval*.json report), in the manifest too.
    """
    folder = Path(folder)
    with atomic_folder(folder, tmp=_temp(folder)) as tmp:
        _write_weights(tmp / WEIGHTS_FILE, weights, FORMAT_V1)
        _write_json(tmp / CONFIG_FILE, config)
        _write_text(tmp / CARD_FILE, card)
        for name, text in (extra or {}).items():
            _write_text(_safe_name(tmp, name), text)
        _write_manifest(tmp)
    return folder


def save_pipeline(
    folder: str | Path,
    pipeline: PipelineConfig | Mapping[str, Any],
    components: Mapping[str, tuple[BaseModel, Mapping[str, Tensor]]],
    card: str,
    *,
    base: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Write a v2 pipeline folder atomically and return its path.

    Args:
        folder: destination; an existing model there is replaced.
        pipeline: PipelineConfig fields except `components` (filled in here), or a PipelineConfig.
        components: {name: (its config, its weights)}; "denoiser" is required.
        card: README.md text.
        base: {component: {other component: sha256 it was made for}}; a value of "" means "the
            one saved here". A recorded hash that does not match the saved component is refused.
    """
    folder = Path(folder)
    fields = pipeline.model_dump() if isinstance(pipeline, BaseModel) else dict(pipeline)
    with atomic_folder(folder, tmp=_temp(folder)) as tmp:
        hashes = {}
        for name, (cfg, weights) in components.items():
            (tmp / name).mkdir()
            _write_weights(tmp / name / WEIGHTS_FILE, weights, cfg.format)
            _write_json(tmp / name / CONFIG_FILE, cfg)
            hashes[name] = sha256_file(tmp / name / WEIGHTS_FILE)
        refs = {}
        for name, sha in hashes.items():
            wanted = {k: (v or hashes.get(k, "")) for k, v in (base or {}).get(name, {}).items()}
            refs[name] = ComponentRef(path=name, sha256=sha, base=wanted)
        fields["components"] = refs
        config = PipelineConfig.model_validate(fields)
        _check_bases(config, hashes, folder)
        _write_json(tmp / PIPELINE_FILE, config)
        _write_text(tmp / CARD_FILE, card)
        _write_manifest(tmp)
    return folder


def save_component(
    folder: str | Path, config: BaseModel, weights: Mapping[str, Tensor], card: str
) -> Path:
    """Write one stand-alone component folder (e.g. a trained VAE) atomically; returns its path.

    The layout is a component sub-folder's (config.json, model.safetensors) plus README.md and a
    manifest.json whose format is the component's (e.g. "difforge-vae/1").
    """
    folder = Path(folder)
    with atomic_folder(folder, tmp=_temp(folder)) as tmp:
        _write_weights(tmp / WEIGHTS_FILE, weights, config.format)
        _write_json(tmp / CONFIG_FILE, config)
        _write_text(tmp / CARD_FILE, card)
        _write_manifest(tmp, config.format)
    return folder


def load_component(folder: str | Path, name: str) -> tuple[Any, nn.Module, str, dict]:
    """A stand-alone component folder, verified and strictly loaded.

    Args:
        folder: written by `save_component`, or a pipeline's component sub-folder (verified
            against the pipeline's manifest).
        name: its component name ("vae", ...): which config class it must validate as.

    Returns:
        (config, network in eval mode, sha256 of model.safetensors, {tensor name: tensor}).
    """
    folder = model_folder(folder)
    parent = folder.parent
    if not (folder / MANIFEST_FILE).exists() and (parent / PIPELINE_FILE).exists():
        # a pipeline's component sub-folder (e.g. models/scenes-latent/vae): the pipeline's
        # manifest covers it, so verify that one and read the sub-folder's hashes from it
        sub = folder.name
        files = {
            k.removeprefix(f"{sub}/"): v
            for k, v in verify_manifest(parent).items()
            if k.startswith(f"{sub}/")
        }
        if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
            raise ModelIntegrityError(
                f"{parent}/{MANIFEST_FILE} does not list {sub}/{WEIGHTS_FILE}"
            )
    else:
        files = verify_manifest(folder)
    config = read_config(folder / CONFIG_FILE, COMPONENT_CONFIGS[name])
    net = load_network(folder, config)
    return config, net, files[WEIGHTS_FILE], load_file(str(folder / WEIGHTS_FILE))


# --- verifying and reading -----------------------------------------------------------------------


def model_folder(path: str | Path) -> Path:
    """The model folder `path` names (a file inside it is accepted); refuses pickles."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelIntegrityError(
            f"refusing to load {p.name}: pickle checkpoints can run arbitrary code; "
            "difforge loads safetensors model folders only"
        )
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    if p.is_file():
        if p.name not in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, CARD_FILE, PIPELINE_FILE):
            raise ModelIntegrityError(f"{p} is not a difforge model folder")
        p = p.parent
    if not (p / WEIGHTS_FILE).is_file() and not (p / PIPELINE_FILE).is_file():
        pickles = sorted(q.name for q in p.rglob("*") if q.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelIntegrityError(
                f"refusing to load {p}: it holds pickle weights ({', '.join(pickles)}), "
                f"not {WEIGHTS_FILE}; difforge loads safetensors only"
            )
        raise ModelIntegrityError(f"{p} is not a difforge model folder (no {WEIGHTS_FILE})")
    return p


def _safe_name(folder: Path, name: str) -> Path:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(q in ("..", ".", "") for q in parts):
        raise ModelIntegrityError(f"{folder}/{MANIFEST_FILE}: bad file name {name!r}")
    return folder.joinpath(*parts)


def verify_manifest(folder: Path) -> dict[str, str]:
    """Check every file against manifest.json; returns {relative path: sha256}."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = dict(manifest["files"])
    except FileNotFoundError:
        raise ModelIntegrityError(f"{folder}: no {MANIFEST_FILE}; not a complete model") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ModelIntegrityError(f"{folder}/{MANIFEST_FILE} is not a valid manifest") from None
    v2 = PIPELINE_FILE in files
    for required in (PIPELINE_FILE,) if v2 else (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files:
            raise ModelIntegrityError(f"{folder}/{MANIFEST_FILE} does not list {required}")
    for name, digest in files.items():
        path = _safe_name(folder, name)
        if not path.is_file():
            raise ModelIntegrityError(f"{folder}: {name} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise ModelIntegrityError(
                f"{folder}/{name} is corrupted or was modified: sha256 {actual[:12]}... "
                f"does not match the manifest's {str(digest)[:12]}..."
            )
    return files


def read_config(path: Path, cls: type[BaseModel]) -> Any:
    """A config file validated as `cls`, or one line naming every bad field."""
    from difforge.common.validation import error_line

    try:
        return cls.model_validate_json(path.read_text())
    except ValidationError as e:
        raise ModelIntegrityError(f"{path}: {error_line(e)}") from None


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


def load_network(folder: Path, config: Any) -> nn.Module:
    """The network of one component folder with its weights loaded strictly (eval, no grad)."""
    from difforge.nets import build_net

    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise ModelIntegrityError(f"{folder}/{WEIGHTS_FILE} is unreadable: {e}") from None
    with torch.random.fork_rng(devices=[]):
        net = build_net(config.net.kind, config.net.config)  # random init is overwritten
    load_weights_strict(net, tensors, f"{folder}/{WEIGHTS_FILE}")
    return net.eval().requires_grad_(False)


def _check_bases(config: PipelineConfig, hashes: Mapping[str, str], where: Path) -> None:
    for name, ref in config.components.items():
        for other, wanted in ref.base.items():
            actual = hashes.get(other)
            if actual != wanted:
                raise ModelIntegrityError(
                    f"{where}: component {name!r} was made for {other} sha256 {wanted[:12]}..., "
                    f"but the {other} here has sha256 {str(actual)[:12]}...; refusing a "
                    "component made for another model"
                )


def read_pipeline(folder: Path, files: Mapping[str, str]) -> tuple[PipelineConfig, dict]:
    """pipeline.json and each component's config, with the component hashes cross-checked."""
    pipeline = read_config(folder / PIPELINE_FILE, PipelineConfig)
    configs, hashes = {}, {}
    for name, ref in pipeline.components.items():
        if name not in COMPONENT_CONFIGS:
            raise ModelIntegrityError(f"{folder}: component {name!r} is not supported yet")
        weights = f"{ref.path}/{WEIGHTS_FILE}"
        if files.get(weights) != ref.sha256:
            raise ModelIntegrityError(
                f"{folder}: {weights} has sha256 {str(files.get(weights))[:12]}... but "
                f"{PIPELINE_FILE} records {ref.sha256[:12]}... for component {name!r}"
            )
        hashes[name] = ref.sha256
        configs[name] = read_config(
            _safe_name(folder, ref.path) / CONFIG_FILE, COMPONENT_CONFIGS[name]
        )
    _check_bases(pipeline, hashes, folder)
    return pipeline, configs
