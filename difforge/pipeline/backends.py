"""How a model's network is run: eager torch (the default), torch.compile, or an ONNX export
under onnxruntime; plus channels_last and bf16 autocast for the torch backends.

Only the bare network call changes. The adapter (EDMPrecond / ModelDenoiser), guidance and
samplers stay difforge's own, so every backend samples with the same code around the network:

    model.with_backend("onnxruntime", onnx_path="net.onnx").sample(labels=[3], seed=0)

The default (`Backend()`, eager) is the model's own denoiser, untouched: its output bytes are
those of `Model.sample` without a backend. Other backends agree within a stated tolerance
(tests/parity/test_backends.py): onnxruntime and compile within 1e-4 of eager on the sampled
latents; bf16 autocast is looser (up to 6e-2 measured on mnist-cond's latents; it rounds
activations to 8 mantissa bits). benchmarks/compile.py and onnx_loop.py measure the speed.

`kernels="invariant"` (eager, float32, contiguous only) runs the network with batch-invariant
kernels (difforge.nets.invariant): an image's bytes then do not depend on how many images share
its call, at any batch size; they differ from the default kernels' in the last bits.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.nets.invariant import batch_invariant
from difforge.nets.onnx import OPSET, OnnxNet, export_onnx

if TYPE_CHECKING:
    from difforge.pipeline.model import Model

BackendKind = Literal["eager", "compile", "onnxruntime"]
Precision = Literal["float32", "bfloat16"]
MemoryFormat = Literal["contiguous", "channels_last"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]
Kernels = Literal["default", "invariant"]


@dataclass(frozen=True)
class Backend:
    """What runs the network inside the denoiser adapter.

    Args:
        kind: "eager" (torch, the default), "compile" (torch.compile, compiled once per input
            shape and kept with the model), "onnxruntime" (an `export_onnx` graph).
        onnx_path: the exported graph; required for, and only for, "onnxruntime".
        precision: "bfloat16" runs the network under CPU autocast (torch kinds only).
        memory_format: "channels_last" converts the weights and input (a copy of the net).
        compile_mode: torch.compile's mode, for "compile".
        threads: onnxruntime intra-op threads [default: torch.get_num_threads()].
        kernels: "invariant" runs Linear / Conv / GroupNorm layers with batch-invariant
            kernels (difforge.nets.invariant; eager float32 contiguous only): an image's output
            does not depend on the batch it is computed in.
    """

    kind: BackendKind = "eager"
    onnx_path: str | None = None
    precision: Precision = "float32"
    memory_format: MemoryFormat = "contiguous"
    compile_mode: CompileMode = "default"
    threads: int | None = None
    kernels: Kernels = "default"

    def __post_init__(self) -> None:
        check_choice("backend", self.kind, get_args(BackendKind))
        check_choice("kernels", self.kernels, get_args(Kernels))
        if self.invariant and (self.kind != "eager" or self.torch_options):
            raise InvalidArgumentError(
                'kernels "invariant" goes with the eager backend in float32, contiguous only'
            )
        check_choice("precision", self.precision, get_args(Precision))
        check_choice("memory_format", self.memory_format, get_args(MemoryFormat))
        check_choice("compile_mode", self.compile_mode, get_args(CompileMode))
        if (self.kind == "onnxruntime") != (self.onnx_path is not None):
            raise InvalidArgumentError("onnx_path is required for, and only for, onnxruntime")
        if self.kind == "onnxruntime" and self.torch_options:
            raise InvalidArgumentError(
                "precision and memory_format apply to the torch backends, not onnxruntime"
            )
        if self.threads is not None and self.threads < 1:
            raise InvalidArgumentError(f"threads must be >= 1, got {self.threads}")

    @property
    def invariant(self) -> bool:
        """Whether the network runs with batch-invariant kernels."""
        return self.kernels == "invariant"

    @property
    def torch_options(self) -> bool:
        """Whether the network call is wrapped (autocast or channels_last)."""
        return self.precision != "float32" or self.memory_format != "contiguous"


class TorchNetCall(nn.Module):
    """net(x, c_noise, cond) under bf16 autocast and/or channels_last, returning float32 (B, ...).

    The autocast region is the network call only: the adapter's c_in/c_skip/c_out and the
    sampler stay in float32 (EDM's precision boundary).
    """

    def __init__(self, net: nn.Module, backend: Backend):
        super().__init__()
        self.net = net
        self.bf16 = backend.precision == "bfloat16"
        self.channels_last = backend.memory_format == "channels_last"

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W), NHWC strides
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(x, c_noise, cond)
        return out.float().contiguous()  # (B, C_out, H, W)


def network_call(model: Model, backend: Backend) -> Any:
    """The callable that runs `model`'s network under `backend` (a NetCall for the adapters)."""
    if backend.kind == "onnxruntime":
        net = OnnxNet(backend.onnx_path, threads=backend.threads)
        made_for = net.metadata.get("model_sha256")
        if made_for != model.sha256:
            raise InvalidArgumentError(
                f"{backend.onnx_path} was exported from model {made_for}, not {model.sha256}"
            )
        return net
    call: nn.Module = batch_invariant(model.net) if backend.invariant else model.net
    if backend.memory_format == "channels_last":
        call = copy.deepcopy(model.net).to(memory_format=torch.channels_last)
    if backend.torch_options:
        call = TorchNetCall(call, backend).eval()
    if backend.kind == "compile":
        # dynamic=False: one graph per input shape (a sampling call keeps its batch fixed), held
        # by this callable; inductor's on-disk cache makes a new process's first call cheaper.
        call = torch.compile(call, mode=backend.compile_mode, dynamic=False)
    return call


def with_backend(model: Model, backend: Backend | str = "eager", **options: Any) -> Model:
    """A shallow copy of `model` whose denoiser runs its network under `backend`.

    Args:
        model: a loaded Model; it is not changed.
        backend: a Backend, or its kind with the other fields as keyword `options`.

    Returns:
        A Model sharing config, spec and weights, with `.backend` set. The eager default
        returns the model's own denoiser (the same bytes).
    """
    from difforge.pipeline.model import build_denoiser

    if isinstance(backend, str):
        backend = Backend(kind=backend, **options)
    elif options:
        raise InvalidArgumentError("pass a Backend or keyword options, not both")
    new = copy.copy(model)
    new.backend = backend
    if backend != Backend():
        new.denoiser = build_denoiser(model.config, network_call(model, backend)).eval()
    if backend.invariant:  # the attached LoRA adapters run with the same kernels
        new.adapters = {
            name: dataclasses.replace(a, denoiser=batch_invariant(a.denoiser))
            for name, a in model.adapters.items()
        }
    return new


@dataclass(frozen=True)
class ExportReport:
    """What `export_model_onnx` wrote and how close the graph is to the eager net."""

    path: Path
    opset: int
    max_abs_diff: float  # eager vs onnxruntime on a seeded check batch (float32)
    inputs: tuple[str, ...]


def _check_batch(model: Model, n: int = 3) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
    """Seeded network inputs (n, *latent_shape), one row per cond the spec can give, null included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *model.latent_shape, generator=gen)  # (n, C, H, W)
    c_noise = torch.linspace(-1.5, 1.5, n)  # (n,): EDM's ln(sigma)/4 over sigma in ~[0.002, 400]
    rows = model.spec.null_batch(n)
    key = model.spec.class_key()
    if rows is not None and key is not None:
        rows[key.name] = torch.arange(n) % (key.num_classes + 1)  # classes and the null class
    return x, c_noise, rows


def export_model_onnx(
    model: Model, out: str | Path, *, opset: int = OPSET, tolerance: float = 1e-4
) -> ExportReport:
    """Export `model`'s bare network to ONNX and check it against eager torch.

    Args:
        model: a loaded Model (its EMA network is exported).
        out: the .onnx file.
        opset: the ONNX opset (recorded in the file).
        tolerance: the largest allowed |eager - onnxruntime| on the check batch.

    Returns:
        An ExportReport. Raises InvalidArgumentError (the file is removed) past `tolerance`.
    """
    meta = {
        "model_name": model.name,
        "model_sha256": model.sha256,
        "latent_shape": list(model.latent_shape),
        "torch": torch.__version__,
    }
    path = export_onnx(model.net, out, opset=opset, metadata=meta)
    x, c_noise, cond = _check_batch(model)
    ort_net = OnnxNet(path, threads=1)
    with torch.no_grad():
        diff = float((ort_net(x, c_noise, cond) - model.net(x, c_noise, cond)).abs().max())
    if not diff <= tolerance:
        path.unlink(missing_ok=True)
        raise InvalidArgumentError(
            f"exported graph differs from eager by {diff:.3g} > {tolerance:g}; removed {path}"
        )
    return ExportReport(path, opset, diff, ort_net.input_names)
