"""Training config validation, loss weightings, noise-level distributions and schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from difforge.core import DiscreteVP, InvalidArgumentError, RectifiedFlow, make_process
from difforge.model import ModelConfig, build_denoiser
from difforge.training import (
    TrainConfig,
    config_diff,
    denoising_loss,
    ema_beta,
    load_config,
    lr_at,
    parse_config,
    sample_sigma,
    x0_weighting,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_edm_recipe():
    c = TrainConfig()
    assert (c.parameterization, c.loss_weighting, c.noise_distribution) == (
        "edm",
        "edm",
        "log_normal",
    )
    assert (c.P_mean, c.P_std, c.cond_dropout) == (-1.2, 1.2, 0.1)
    with pytest.raises(Exception, match="frozen"):
        c.batch_size = 3


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("parameterization", "epsilon", "'eps', 'x0', 'v', 'velocity' or 'edm'"),
        ("loss_weighting", "snr", "'native', 'min_snr' or 'edm'"),
        ("noise_distribution", "cosine", "'uniform_t', 'log_normal' or 'logit_normal'"),
        ("precision", "fp16", "'fp32' or 'bf16'"),
    ],
)
def test_a_bad_choice_lists_the_allowed_values(field, value, allowed):
    with pytest.raises(InvalidArgumentError, match=f"{field}: Input should be {allowed}"):
        parse_config({field: value})


def test_bad_fields_are_named_in_one_message():
    with pytest.raises(InvalidArgumentError) as e:
        parse_config({"optim": {"lr": -1}, "batch_size": 0, "colour": "red"})
    message = str(e.value)
    assert "optim.lr" in message and "batch_size" in message and "colour" in message
    assert "\n" not in message


def test_incompatible_combinations_are_refused():
    with pytest.raises(InvalidArgumentError, match="'edm' needs a VE process"):
        parse_config({"process": {"kind": "vp"}})
    with pytest.raises(InvalidArgumentError, match="logit_normal"):
        parse_config({"noise_distribution": "logit_normal"})
    with pytest.raises(InvalidArgumentError, match="unknown process kind"):
        parse_config({"process": {"kind": "sde"}})
    with pytest.raises(InvalidArgumentError, match="unknown sampler"):
        parse_config({"sampling": {"sampler": "plms"}})
    with pytest.raises(InvalidArgumentError, match="UNetConfig keys"):
        parse_config({"net": {"kind": "unet", "config": {"widths": 3}}})


def test_net_config_is_stored_complete():
    c = parse_config({"net": {"config": {"base_channels": 32}}})
    assert c.net.config["base_channels"] == 32 and "num_res_blocks" in c.net.config
    assert parse_config(json.loads(c.to_json())) == c


def test_reference_mnist_config_is_valid():
    c = load_config(REPO / "configs" / "mnist.json")
    assert c.parameterization == "edm" and c.dataset.startswith("mnist")
    assert c.net.config["num_classes"] == 10


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_config_diff_is_readable():
    a = TrainConfig().model_dump(mode="json")
    b = TrainConfig(optim={"lr": 2e-3}, seed=4).model_dump(mode="json")
    assert config_diff(a, b) == ["optim.lr: 0.001 -> 0.002", "seed: 0 -> 4"]


class _Linear(nn.Module):
    """A tiny net: 1x1 conv of x plus a function of c_noise (enough to test the loss algebra)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.t = nn.Linear(1, 1)

    def forward(self, x, c_noise, cond=None):
        return self.conv(x) + self.t(c_noise.float()[:, None])[:, :, None, None]


SETUPS = [
    ("eps", {"kind": "vp"}),
    ("x0", {"kind": "vp", "schedule": "cosine"}),
    ("v", {"kind": "vp"}),
    ("velocity", {"kind": "flow"}),
    ("edm", {"kind": "ve"}),
]


@pytest.mark.parametrize(("parameterization", "process"), SETUPS)
@pytest.mark.parametrize("weighting", ["native", "min_snr", "edm"])
def test_loss_is_an_x0_space_weighted_regression(parameterization, process, weighting):
    """lambda/w * ||F - target||^2 == lambda * ||D(x) - x0||^2 for every prediction type."""
    torch.manual_seed(0)
    cfg = parse_config(
        {"parameterization": parameterization, "process": process, "loss_weighting": weighting}
    )
    mc = ModelConfig(
        name="t",
        net={"kind": "unet", "config": {}},
        process=process,
        parameterization=parameterization,
        image_shape=(1, 4, 4),
    )
    denoiser = build_denoiser(mc, _Linear())
    x0, eps = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 20.0])
    if process["kind"] != "ve":
        p = make_process(process)
        sigma = sigma.clamp(p.sigma_min, p.sigma_max)
    loss = denoising_loss(denoiser, x0, sigma, eps, None, cfg)
    _, _, native = denoiser.loss_terms(x0, sigma, eps)
    lam = x0_weighting(cfg, sigma, torch.as_tensor(native))
    x0_hat = denoiser(x0 + sigma[:, None, None, None] * eps, sigma)
    expected = (lam * (x0_hat - x0).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)


def test_min_snr_weight_is_min_of_snr_and_gamma():
    cfg = parse_config({"loss_weighting": "min_snr", "min_snr_gamma": 5.0})
    sigma = torch.tensor([0.1, 1 / math.sqrt(5), 1.0, 10.0])
    w = x0_weighting(cfg, sigma, torch.ones(4))
    assert torch.allclose(w, torch.tensor([5.0, 5.0, 1.0, 0.01]))


def test_noise_level_distributions():
    g = torch.Generator().manual_seed(0)
    edm = TrainConfig()
    s = sample_sigma(edm, make_process(edm.process), 20000, g)
    assert s.dtype == torch.float32 and s.shape == (20000,)
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.03)
    vp_cfg = parse_config({"parameterization": "eps", "process": {"kind": "vp"}})
    vp = DiscreteVP()
    s = sample_sigma(vp_cfg.model_copy(update={"noise_distribution": "uniform_t"}), vp, 5000, g)
    assert torch.isin(s, vp.sigmas.float()).all()
    flow = parse_config(
        {
            "parameterization": "velocity",
            "process": {"kind": "flow"},
            "noise_distribution": "logit_normal",
        }
    )
    rf = RectifiedFlow()
    s = sample_sigma(flow, rf, 5000, g)
    t = s.double() / (1 + s.double())
    assert t.min() >= rf.t_min - 1e-6 and t.max() <= rf.t_max + 1e-6
    assert torch.logit(t).median().item() == pytest.approx(0.0, abs=0.1)


def test_learning_rate_schedule():
    c = parse_config(
        {"max_steps": 110, "optim": {"lr": 1.0, "warmup_steps": 10, "schedule": "cosine"}}
    )
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 60) == pytest.approx(0.5) and lr_at(c, 110) == pytest.approx(0.0)
    const = parse_config({"optim": {"lr": 1.0, "warmup_steps": 0}})
    assert lr_at(const, 0) == lr_at(const, 999) == 1.0


def test_rsqrt_schedule_is_edm2_and_independent_of_the_budget():
    optim = {"lr": 2.0, "warmup_steps": 10, "schedule": "rsqrt", "decay_steps": 100}
    short, long = (parse_config({"max_steps": m, "optim": optim}) for m in (600, 1200))
    assert lr_at(short, 0) == pytest.approx(0.2) and lr_at(short, 9) == pytest.approx(2.0)
    assert lr_at(short, 50) == lr_at(short, 100) == pytest.approx(2.0)  # flat until decay_steps
    assert lr_at(short, 400) == pytest.approx(1.0)  # 2 / sqrt(400 / 100)
    assert lr_at(short, 2500) == pytest.approx(0.4)  # past max_steps the curve goes on
    # A 600-step run resumed to 1200 follows the curve a 1200-step run would have.
    assert [lr_at(short, s) for s in range(0, 1200, 37)] == [
        lr_at(long, s) for s in range(0, 1200, 37)
    ]
    floored = parse_config({"optim": optim | {"min_lr_ratio": 0.25}})
    assert lr_at(floored, 10**6) == pytest.approx(0.5)


def test_ema_half_life_with_ramp():
    c = parse_config({"batch_size": 100, "ema": {"halflife_images": 1000, "rampup_ratio": 0.1}})
    assert ema_beta(c, 1000) == pytest.approx(0.5)  # h = 100 images = one batch
    assert ema_beta(c, 10**6) == pytest.approx(0.5**0.1)  # capped at the half-life
    fixed = parse_config(
        {"batch_size": 100, "ema": {"halflife_images": 1000, "rampup_ratio": None}}
    )
    assert ema_beta(fixed, 100) == pytest.approx(0.5**0.1)
