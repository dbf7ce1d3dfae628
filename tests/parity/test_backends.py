"""Backends run the same network: onnxruntime (an ONNX export), torch options, the eager default.

The export is the slow part (torch.export + the ONNX optimizer, ~5-20 s on a tiny net), so one
tiny EDM model is exported once per module and every test reuses the file.
"""

from __future__ import annotations

import pytest
import torch

from difforge.core.denoiser import ModelDenoiser
from difforge.core.errors import InvalidArgumentError, UnknownChoiceError
from difforge.core.processes import make_process
from difforge.nets import UNetConfig, build_net
from difforge.nets.onnx import OPSET, OnnxNet, read_metadata
from difforge.pipeline import ModelConfig, NetSpec, SamplingDefaults, load, resolve, save_model
from difforge.pipeline.backends import Backend, export_model_onnx
from difforge.samplers import sample
from tests.helpers import TINY_NET

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model(folder, seed: int):
    cfg = UNetConfig.from_dict(TINY_NET["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net("unet", cfg)
        with torch.no_grad():  # zero-initialised output convs would make every net alike
            for p in net.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
    config = ModelConfig(
        name=f"tiny-edm-{seed}",
        net=NetSpec(kind="unet", config=cfg.to_dict()),
        process={"kind": "ve", "sigma_min": 0.002, "sigma_max": 80.0},
        parameterization="edm",
        num_classes=cfg.num_classes,
        image_shape=(1, 8, 8),
        sampling=SamplingDefaults(sampler="dpmpp_2m", steps=6, guidance=2.0),
    )
    return load(save_model(folder, config, net.state_dict(), "# tiny\n"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the tiny model, its exported graph's path, the export report)."""
    root = tmp_path_factory.mktemp("onnx")
    model = _tiny_model(root / "model", seed=0)
    report = export_model_onnx(model, root / "net.onnx")
    return model, report.path, report


def _latents(model, n: int, **request):
    plan = resolve(model, {"n": n, "seed": 7, "labels": [i % 3 for i in range(n)], **request})
    return model.sample_latents(plan.rows, plan)[0]  # (n, 1, 8, 8) float32


def test_export_records_opset_inputs_and_the_model(exported):
    model, path, report = exported
    meta = read_metadata(path)
    assert meta["opset"] == OPSET == report.opset
    assert meta["model_sha256"] == model.sha256
    assert meta["cond_keys"] == ["labels"]
    assert report.inputs == ("x", "c_noise", "labels")
    assert report.max_abs_diff <= 1e-4


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_the_graph_has_a_dynamic_batch_and_plain_tensor_conditioning(exported, batch):
    model, path, _ = exported
    net = OnnxNet(path)
    gen = torch.Generator().manual_seed(batch)
    x, c_noise = torch.randn(batch, 1, 8, 8, generator=gen), torch.randn(batch, generator=gen)
    labels = torch.randint(0, 4, (batch,), generator=gen)  # 3 = the null class
    with torch.no_grad():
        for cond in ({"labels": labels}, None):  # None: the null class, as in the torch net
            want = model.net(x, c_noise, cond)
            assert (net(x, c_noise, cond) - want).abs().max() <= 1e-5


@pytest.mark.parametrize(("n", "sampler"), [(1, "dpmpp_2m"), (4, "dpmpp_2m"), (3, "heun")])
def test_onnxruntime_sampling_loop_matches_eager(exported, n, sampler):
    """The full loop (EDM adapter, CFG at guidance 2, difforge's sampler) within 1e-4 of eager."""
    model, path, _ = exported
    ort_model = model.with_backend("onnxruntime", onnx_path=str(path))
    assert ort_model.denoiser is not model.denoiser and ort_model.backend.kind == "onnxruntime"
    want = _latents(model, n, sampler=sampler)
    got = _latents(ort_model, n, sampler=sampler)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4


def test_the_graph_runs_under_the_model_denoiser_adapter_too(exported):
    """The same graph as an x0-predicting net on a VP process: ModelDenoiser wraps it unchanged."""
    model, path, _ = exported
    process = make_process({"kind": "vp", "schedule": "cosine"})
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0])
    cond = {"labels": torch.tensor([0, 1, 2])}
    out = [
        sample(
            ModelDenoiser(net, process, "x0"),
            sigmas,
            shape=(1, 8, 8),
            seeds=[1, 2, 3],
            sampler="euler",
            cond=cond,
        ).x
        for net in (model.net, OnnxNet(path))
    ]
    assert (out[0] - out[1]).abs().max() <= 1e-4


def test_a_graph_of_another_model_is_refused(exported, tmp_path):
    _, path, _ = exported
    other = _tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(InvalidArgumentError, match="was exported from model"):
        other.with_backend("onnxruntime", onnx_path=str(path))


def test_the_eager_default_is_the_model_itself(exported):
    model, _, _ = exported
    same = model.with_backend()
    assert same.denoiser is model.denoiser and same.backend == Backend()
    assert torch.equal(_latents(same, 3), _latents(model, 3))


@pytest.mark.parametrize(
    ("options", "tolerance"),
    [({"memory_format": "channels_last"}, 1e-4), ({"precision": "bfloat16"}, 5e-2)],
)
def test_torch_options_stay_within_their_tolerance(exported, options, tolerance):
    """Largest change of a latent, as a fraction of the largest latent (1.93 here). bf16 rounds
    at 2^-8 and its CPU kernels differ by machine: 0.0501 absolute on an Intel Xeon with native
    bf16 (relative 2.6%, RMS 1.9%), under 0.05 on the AMD EPYC the bound was first set on."""
    model, _, _ = exported
    want = _latents(model, 4)
    diff = (_latents(model.with_backend("eager", **options), 4) - want).abs().max()
    assert diff <= tolerance * want.abs().max()
    if "precision" in options:
        assert diff > 0  # bf16 really ran (an autocast that did nothing would pass the bound)
    assert model.net.conv_in.weight.is_contiguous()  # the model's own net is not converted


@pytest.mark.slow
def test_compiled_sampling_matches_eager(exported):
    model, _, _ = exported
    compiled = model.with_backend("compile")
    want = _latents(model, 2)
    for _ in range(2):  # the second call reuses the graph compiled by the first
        assert (_latents(compiled, 2) - want).abs().max() <= 1e-4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kind": "tensorrt"}, UnknownChoiceError, "eager, compile, onnxruntime"),
        ({"kind": "onnxruntime"}, InvalidArgumentError, "onnx_path is required"),
        ({"kind": "eager", "onnx_path": "x.onnx"}, InvalidArgumentError, "onnx_path is required"),
        (
            {"kind": "onnxruntime", "onnx_path": "x.onnx", "precision": "bfloat16"},
            InvalidArgumentError,
            "torch backends",
        ),
        ({"precision": "float16"}, UnknownChoiceError, "float32, bfloat16"),
        ({"threads": 0}, InvalidArgumentError, "threads"),
    ],
)
def test_a_bad_backend_is_one_readable_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        Backend(**kwargs)
