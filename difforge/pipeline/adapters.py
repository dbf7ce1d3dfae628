"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation"): low-rank updates W + (alpha / r)
B A of a base model's layers, made by `peft` (the library diffusers uses) and kept beside it.

An adapter is a folder: `adapter.safetensors` (the lora_A / lora_B tensors, named as in the
base net with peft's injected layers) whose safetensors metadata holds the format, its rank, alpha,
target modules, the base model's sha256 and how it was trained, and a README. Loading refuses
anything else (no pickles), and applying it to a model whose sha256 is not the recorded base is
refused with a message naming both hashes.

`apply_adapter(model, adapter, scale)` returns a new Model (the base is untouched) that runs the
adapter at sampling time with its update scaled by `scale`; `merge=True` folds the update into the
base weights instead (peft's merge) and returns a plain net: same outputs to round-off, no
extra cost per step. Its identity is sha256("<base sha256>+<adapter sha256>@<scale>").
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from difforge.core.errors import DifforgeError, InvalidArgumentError
from difforge.nets.invariant import batch_invariant

if TYPE_CHECKING:
    from difforge.pipeline.model import Model

ADAPTER_FORMAT = "difforge-lora/1"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_NAME = "default"  # peft's adapter name inside a net


class AdapterMismatch(DifforgeError):
    """An adapter applied to a model other than its base."""


@dataclass(frozen=True)
class Adapter:
    """A loaded LoRA adapter: its tensors and what its metadata records."""

    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_sha256: str
    sha256: str  # of adapter.safetensors
    tensors: dict[str, Tensor]
    training: dict[str, Any]

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def inject_lora(net: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> nn.Module:
    """Add peft LoRA layers to `net` in place (B = 0: the net computes what it did); returns it."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    return inject_adapter_in_model(config, net, adapter_name=ADAPTER_NAME)


def lora_state(net: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of a net with injected LoRA layers, {name: tensor}."""
    return {k: v.detach().clone() for k, v in net.state_dict().items() if ".lora_" in k}


def save_adapter(
    folder: str | Path,
    net: nn.Module,
    *,
    name: str,
    rank: int,
    alpha: float,
    target_modules: tuple[str, ...],
    base_sha256: str,
    training: dict[str, Any],
    card: str,
) -> Path:
    """Write an adapter folder (adapter.safetensors with metadata, README.md); returns it."""
    from safetensors.torch import save

    from difforge.common.atomic import atomic_file

    meta = {
        "format": ADAPTER_FORMAT,
        "name": name,
        "rank": str(rank),
        "alpha": repr(float(alpha)),
        "target_modules": json.dumps(list(target_modules)),
        "base_sha256": base_sha256,
        "training": json.dumps(training, sort_keys=True),
    }
    folder = Path(folder)
    for name_, data in ((ADAPTER_FILE, save(lora_state(net), metadata=meta)), ("README.md", card)):
        with atomic_file(folder / name_, mode=0o644) as f:  # as a model folder's files
            f.write(data if isinstance(data, bytes) else data.encode())
    return folder


def load_adapter(folder: str | Path) -> Adapter:
    """Read an adapter folder written by `save_adapter` (or by `difforge train-lora`)."""
    from safetensors import safe_open
    from safetensors.torch import load

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise InvalidArgumentError(f"no adapter at {folder}: {ADAPTER_FILE} is missing")
    data = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != ADAPTER_FORMAT:
        raise InvalidArgumentError(f"{path}: not a {ADAPTER_FORMAT} adapter ({meta.get('format')})")
    return Adapter(
        name=meta["name"],
        rank=int(meta["rank"]),
        alpha=float(meta["alpha"]),
        target_modules=tuple(json.loads(meta["target_modules"])),
        base_sha256=meta["base_sha256"],
        sha256=hashlib.sha256(data).hexdigest(),
        tensors=load(data),
        training=json.loads(meta.get("training", "{}")),
    )


def check_base(model: Model, adapter: Adapter) -> None:
    """Raise AdapterMismatch unless `model` is the base the adapter was trained on."""
    if model.sha256 != adapter.base_sha256:
        raise AdapterMismatch(
            f"adapter {adapter.name!r} was trained on base model sha256 {adapter.base_sha256}; "
            f"model {model.name!r} has sha256 {model.sha256}: refusing to apply it"
        )


def _lora_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


def _adapted_net(model: Model, adapter: Adapter, scale: float) -> nn.Module:
    net = inject_lora(copy.deepcopy(model.net), adapter.rank, adapter.alpha, adapter.target_modules)
    want = set(lora_state(net))
    if want != set(adapter.tensors):
        missing, extra = sorted(want - set(adapter.tensors)), sorted(set(adapter.tensors) - want)
        raise InvalidArgumentError(
            f"adapter {adapter.name!r} does not fit the net: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    net.load_state_dict(adapter.tensors, strict=False)
    for layer in _lora_layers(net):
        layer.set_scale(ADAPTER_NAME, scale)
    return net


def merged_state(net: nn.Module) -> dict[str, Tensor]:
    """Fold each LoRA update into its base layer (peft's merge) -> the plain net's state dict."""
    for layer in _lora_layers(net):
        layer.merge(safe_merge=True)
    out = {}
    for key, value in net.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().clone()
    return out


@dataclass(frozen=True, eq=False)
class AttachedAdapter:
    """An adapter a model serves beside its base (`SampleRequest.adapter` names it)."""

    name: str
    sha256: str
    scale: float
    denoiser: nn.Module  # the adapted net in the base's denoiser adapter

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "scale": self.scale}


def attach_adapter(
    model: Model, adapter: Adapter, *, name: str | None = None, scale: float = 1.0
) -> AttachedAdapter:
    """Let `model` serve `adapter` at `scale` under `name` (default its own) beside the base:
    requests that name it sample with the adapted net, the others with the base.

    Raises:
        AdapterMismatch: `model` is not the adapter's base (the message names both hashes).
    """
    from difforge.pipeline.model import build_denoiser

    check_base(model, adapter)
    net = _adapted_net(model, adapter, float(scale)).eval().requires_grad_(False)
    denoiser = build_denoiser(model.config, net)
    if getattr(model.backend, "invariant", False):  # the model's batch-invariant kernels
        denoiser = batch_invariant(denoiser)
    attached = AttachedAdapter(name or adapter.name, adapter.sha256, float(scale), denoiser)
    model.adapters[attached.name] = attached
    return attached


def apply_adapter(model: Model, adapter: Adapter, scale: float = 1.0, merge: bool = False) -> Model:
    """A new Model: `model` with `adapter` applied at `scale` (0 = the base), merged or not.

    Raises:
        AdapterMismatch: `model` is not the adapter's base (the message names both hashes).
    """
    from difforge.pipeline.model import Model, build_network

    check_base(model, adapter)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or scale != scale:
        raise InvalidArgumentError(f"adapter scale must be a number, got {scale!r}")
    net = _adapted_net(model, adapter, float(scale))
    if merge:
        plain = build_network(model.config.net)
        plain.load_state_dict(merged_state(net), strict=True)
        net = plain
    identity = hashlib.sha256(f"{model.sha256}+{adapter.sha256}@{float(scale)!r}".encode())
    adapted = Model(
        model.config,
        net,
        identity.hexdigest(),
        model.path,
        pipeline=model.pipeline,
        vae=model.vae,
        vae_config=model.vae_config,
    )
    adapted.name = f"{model.name}+{adapter.name}"
    return adapted
