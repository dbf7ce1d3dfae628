"""ONNX export of a bare difforge network, and a callable that runs the exported graph.

The graph takes the net's forward(x, c_noise, cond) with the conditioning as plain tensors:

    x        (B, C, H, W) float32     the network input (already scaled by the adapter)
    c_noise  (B,)         float32     the noise-level input
    labels   (B,)         int64       only for class-conditional nets; num_classes = null class
    context  (B, L, D)    float32     only for nets with cross-attention
    -> out   (B, C_out, H, W) float32

B (and L) are dynamic. No diffusion math is exported: `OnnxNet` is a `NetCall`, so difforge's own
adapters (EDMPrecond, ModelDenoiser), guidance and samplers run around it unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError

# ONNX opset of exported graphs: 18 is torch.onnx's dynamo exporter's own target in torch 2.13
# (no down-conversion step), GroupNormalization-free decomposition included, and every
# onnxruntime >= 1.14 runs it.
OPSET = 18
META_PREFIX = "difforge."
_COND_DTYPES = {"labels": np.int64, "context": np.float32}


def onnx_cond_keys(net: nn.Module) -> tuple[str, ...]:
    """The conditioning tensors a difforge net's graph takes, in input order."""
    cfg = getattr(net, "config", None)
    keys = []
    if getattr(cfg, "num_classes", 0):
        keys.append("labels")
    if getattr(cfg, "context_dim", None) is not None:
        keys.append("context")
    return tuple(keys)


class _PlainInputs(nn.Module):
    """forward(x, c_noise, *cond tensors) -> net(x, c_noise, {key: tensor}): what torch.export sees."""

    def __init__(self, net: nn.Module, keys: Sequence[str]):
        super().__init__()
        self.net = net
        self.keys = tuple(keys)

    def forward(self, x: Tensor, c_noise: Tensor, *cond: Tensor) -> Tensor:
        return self.net(x, c_noise, dict(zip(self.keys, cond, strict=True)) or None)


def _example_inputs(net: nn.Module, keys: Sequence[str]) -> tuple[Tensor, ...]:
    """Batch-2 inputs (torch.export specialises a batch of 1) in the net's own shapes."""
    cfg = net.config
    x = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)  # (2, C, H, W)
    out = [x, torch.zeros(2)]
    for key in keys:
        if key == "labels":
            out.append(torch.tensor([0, cfg.num_classes]))  # a class and the null class
        else:
            out.append(torch.zeros(2, 3, cfg.context_dim))  # (2, L, D)
    return tuple(out)


def export_onnx(
    net: nn.Module,
    path: str | Path,
    *,
    opset: int = OPSET,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export `net` (a difforge denoiser net with `.config`) to an ONNX file with dynamic batch.

    Args:
        net: e.g. a `UNet`; it is exported in eval mode, in float32.
        path: the .onnx file to write (replaced atomically).
        opset: the ONNX opset; recorded in the file's metadata as `difforge.opset`.
        metadata: extra JSON-able values stored as `difforge.<key>` metadata properties.

    Returns:
        The path written.
    """
    if not hasattr(net, "config"):
        raise InvalidArgumentError(f"{type(net).__name__} has no .config: not a difforge net")
    if getattr(net, "guidance_embed", None) is not None:  # the graph would drop the w input
        raise InvalidArgumentError("a guidance-input student (guidance_embed) cannot be exported")
    keys = onnx_cond_keys(net)
    names = ("x", "c_noise", *keys)
    batch = torch.export.Dim("batch", min=1)
    shapes = {"x": {0: batch}, "c_noise": {0: batch}}
    for key in keys:
        shapes[key] = (
            {0: batch, 1: torch.export.Dim("context_len", min=1)}
            if key == "context"
            else {0: batch}
        )
    wrapped = _PlainInputs(net, keys).eval()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapped,
            _example_inputs(net, keys),
            dynamo=True,
            input_names=list(names),
            output_names=["out"],
            dynamic_shapes={
                "x": shapes["x"],
                "c_noise": shapes["c_noise"],
                "cond": tuple(shapes[k] for k in keys),
            },
            opset_version=opset,
            verbose=False,
        )
    props = {"opset": opset, "cond_keys": list(keys), "num_classes": net.config.num_classes}
    for key, value in {**props, **(metadata or {})}.items():
        program.model.metadata_props[META_PREFIX + key] = json.dumps(value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        program.save(str(tmp), external_data=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `difforge.*` metadata of an exported graph, JSON-decoded (without the prefix)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key[len(META_PREFIX) :]: json.loads(p.value)
        for p in model.metadata_props
        if p.key.startswith(META_PREFIX)
    }


class OnnxNet:
    """An exported net under onnxruntime, called like the torch net: (x, c_noise, cond) -> out.

    Tensors cross to numpy and back on the CPU; the output is float32. Missing labels mean the
    null class, as in the torch net.

    Args:
        path: an .onnx file written by `export_onnx`.
        threads: onnxruntime intra-op threads [default: torch.get_num_threads(), for parity
            with eager torch].
    """

    def __init__(self, path: str | Path, *, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.cond_keys = self.input_names[2:]

    def __repr__(self) -> str:
        return f"OnnxNet({str(self.path)!r}, inputs={self.input_names})"

    def _cond_array(self, key: str, cond: Mapping[str, Tensor] | None, batch: int) -> np.ndarray:
        value = None if cond is None else cond.get(key)
        if value is None and key == "labels":
            value = torch.full((batch,), int(self.metadata.get("num_classes", 0)))
        if value is None:
            raise InvalidArgumentError(f"the exported net needs cond[{key!r}]")
        return np.ascontiguousarray(value.detach().cpu().numpy(), dtype=_COND_DTYPES[key])

    def __call__(
        self, x: Tensor, c_noise: Tensor, cond: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        batch = x.shape[0]
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        feeds = {
            "x": np.ascontiguousarray(x.detach().cpu().float().numpy()),  # (B, C, H, W)
            "c_noise": np.ascontiguousarray(c_noise.detach().cpu().float().numpy()),  # (B,)
        }
        for key in self.cond_keys:
            feeds[key] = self._cond_array(key, cond, batch)
        (out,) = self.session.run(["out"], feeds)  # (B, C_out, H, W) float32
        return torch.from_numpy(out).to(x.device)
