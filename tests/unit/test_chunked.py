"""difforge.core.chunked: the network only ever sees `rows` rows, and a row's output does not
depend on the batch; the serving probe for chunked calls and its fallback."""

from __future__ import annotations

import pytest
import torch

from difforge.core.chunked import ChunkedDenoiser, chunked
from difforge.core.errors import InvalidArgumentError
from difforge.nets import UNetConfig, build_net
from difforge.pipeline import Model, ModelConfig, NetSpec, SamplingDefaults
from difforge.pipeline.conditioning import ConditioningSpec
from difforge.serving.batching import BatchKey, BatchPlan, Row, sample_rows
from difforge.serving.invariance import choose_plan, probe_chunked


class _Recorder:
    """A denoiser that records its batch sizes and depends on every row's own inputs."""

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, x, sigma, cond=None):
        self.sizes.append(x.shape[0])
        labels = cond["labels"].float().view(-1, 1, 1, 1)
        return x * sigma.view(-1, 1, 1, 1) + labels


@pytest.mark.parametrize(("batch", "rows", "calls"), [(5, 2, 3), (4, 4, 1), (1, 4, 1), (7, 1, 7)])
def test_chunks_are_all_the_same_size_and_rows_keep_their_own_inputs(batch, rows, calls):
    rec = _Recorder()
    x = torch.randn(batch, 1, 3, 3)
    sigma = torch.linspace(0.5, 2.0, batch)
    cond = {"labels": torch.arange(batch)}
    out = ChunkedDenoiser(rec, rows)(x, sigma, cond)
    assert rec.sizes == [rows] * calls
    assert torch.equal(out, _Recorder()(x, sigma, cond))  # padding rows are thrown away
    assert out.shape == x.shape


def test_chunked_none_is_the_denoiser_itself_and_bad_inputs_are_refused():
    rec = _Recorder()
    assert chunked(rec, None) is rec
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="chunk rows"):
            ChunkedDenoiser(rec, bad)
    d = ChunkedDenoiser(rec, 2)
    with pytest.raises(InvalidArgumentError, match="sigma"):
        d(torch.zeros(3, 1, 2, 2), torch.ones(2), {"labels": torch.zeros(3)})
    with pytest.raises(InvalidArgumentError, match="labels"):
        d(torch.zeros(3, 1, 2, 2), torch.ones(3), {"labels": torch.zeros(2)})


@pytest.fixture(scope="module")
def unet_model():
    """A random tiny conditional U-Net model (outputs perturbed away from zero)."""
    cfg = UNetConfig(in_channels=1, out_channels=1, num_classes=4, image_size=8, base_channels=8,
                     channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[4], head_dim=8,
                     norm_groups=4)  # fmt: skip
    torch.manual_seed(0)
    net = build_net("unet", cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    config = ModelConfig(
        name="chunk-test",
        net=NetSpec(kind="unet", config=cfg.to_dict()),
        process={"kind": "vp", "schedule": "cosine"},
        parameterization="x0",
        num_classes=4,
        image_shape=(1, 8, 8),
        sampling=SamplingDefaults(sampler="dpmpp_2m", steps=4, guidance=2.0),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Model(config, net, "0" * 64)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_a_chunked_image_is_bitwise_the_same_alone_or_in_any_batch(unet_model, chunk):
    """Float sampler output, guided (two forward rows per image): alone vs at every position of
    batches of 2, 3 and 5 among other images."""
    model = unet_model
    key = BatchKey("v", "dpmpp_2m", 3, "karras", (1, 8, 8), True)
    cond = model.spec.resolve({"labels": [0, 1, 2, 3]}, 4)
    target = Row(seed=5, cond=cond[2], guidance=3.0)
    alone, _ = sample_rows(model, key, [target], chunk_rows=chunk)
    assert alone.abs().max() < 10 and alone.std() > 0.1  # a sane, input-dependent image
    for size in (2, 3, 5):
        for pos in range(size):
            rows = [Row(seed=50 + i, cond=cond[i % 4], guidance=1.5 + i) for i in range(size)]
            rows[pos] = target
            x, _ = sample_rows(model, key, rows, chunk_rows=chunk)
            assert torch.equal(x[pos], alone[0]), (size, pos)
    # the library gives the same bytes in-process
    plain = model.sample(labels=[2], seed=5, guidance=3.0, sampler="dpmpp_2m", steps=3)
    samples = model.sample(labels=[2], seed=5, guidance=3.0, sampler="dpmpp_2m", steps=3,
                           chunk_rows=chunk)  # fmt: skip
    x, _ = sample_rows(model, key, [target, Row(seed=9, cond=cond[1], guidance=2.0)],
                       chunk_rows=chunk)  # fmt: skip
    assert torch.equal(samples.images[0], model.decode(x)[0])
    assert torch.equal(model.decode(alone)[0], samples.images[0])
    if chunk == 2:  # one guided image is one 2-row forward, chunked or not
        assert torch.equal(plain.images, samples.images)


class _ChunkSensitiveModel:
    """A denoiser whose output moves with its position inside a call of more than 2 rows."""

    spec = ConditioningSpec()
    image_shape = latent_shape = (1, 4, 4)
    sample_latents = Model.sample_latents
    layout = layout_config = None  # no layout stage

    def __init__(self):
        from difforge.core.processes import make_process

        self.process = make_process({"kind": "ve", "sigma_min": 0.01, "sigma_max": 10.0})

    def denoiser(self, x, sigma, cond=None):
        out = x / (1 + sigma.view(-1, 1, 1, 1) ** 2)
        if x.shape[0] > 2:
            out = out.clone()
            out[2:] += 1e-6
        return out


def test_the_chunk_probe_passes_a_safe_chunk_and_falls_back_from_an_unsafe_one():
    key = BatchKey("v", "euler", 2, "karras", (1, 4, 4), False)
    model = _ChunkSensitiveModel()
    safe = probe_chunked(model, key, 6, 2)
    assert safe.invariant and safe.chunk_rows == 2 and safe.positions == tuple(range(6))
    unsafe = probe_chunked(model, key, 6, 4)
    assert not unsafe.invariant and unsafe.sizes_differing and unsafe.max_abs_diff > 0
    plan = choose_plan(model, [key], "chunk", 6, 2)
    assert (plan.mode, plan.chunk_rows, plan.micro(False), plan.pad) == ("chunk", 2, 6, False)
    assert plan.invariant and plan.probe["invariant"]
    fallback = choose_plan(model, [key], "chunk", 6, 4)
    assert fallback.mode == "per_sample" and fallback.chunk_rows is None
    assert fallback.probe["reports"][0]["sizes_differing"]
    with pytest.raises(ValueError, match="chunk_rows"):
        BatchPlan("pad", 8, chunk_rows=2)
    with pytest.raises(ValueError, match="chunk_rows"):
        BatchPlan("chunk", 8)
