"""The NFE sweep (`nfe_sweep`): budgets -> steps, one point per sampler x budget, JSON and plot.

Uses the tiny random 28x28 model and 1000-image references of tests/unit/test_eval_report.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.evaluation import (
    DifforgeMethod,
    SweepConfig,
    load_feature_extractor,
    nfe_sweep,
    steps_for_nfe,
)
from difforge.model import load
from tests.unit.test_eval_report import N, make_tiny_model, small_references

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(make_tiny_model(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    extractor = load_feature_extractor()
    r = small_references(extractor, tmp_path_factory.mktemp("cache"))
    return {"extractor": extractor, "reference": r["reference"]}


def test_sweep_config_parses_samplers_and_budgets():
    assert SweepConfig().samplers == SweepConfig(samplers=["all"]).samplers
    assert "ddim" not in SweepConfig().samplers, "aliases are left out of 'all'"
    assert SweepConfig(samplers="heun").samplers == ("heun",)
    with pytest.raises(InvalidArgumentError, match="allowed values: ddpm"):
        SweepConfig(samplers=("heun", "plms"))
    with pytest.raises(InvalidArgumentError, match="listed twice"):
        SweepConfig(samplers=("heun", "heun"))
    with pytest.raises(InvalidArgumentError, match="nfe budget must be an integer >= 1"):
        SweepConfig(nfe=(5, 0))
    with pytest.raises(InvalidArgumentError, match="reference_steps"):
        SweepConfig(reference_steps=0)


def test_steps_for_nfe_stays_within_the_budget(model):
    heun = DifforgeMethod(model, "heun")  # 2 NFE per step, the last one 1
    assert [steps_for_nfe(heun, t) for t in (1, 5, 8, 10, 50)] == [1, 3, 4, 5, 25]
    assert [heun.nfe(steps_for_nfe(heun, t)) for t in (5, 8, 10)] == [5, 7, 9]
    euler = DifforgeMethod(model, "euler")
    assert [steps_for_nfe(euler, t) for t in (5, 8, 10)] == [5, 8, 10]
    with pytest.raises(InvalidArgumentError, match="too few"):
        steps_for_nfe(euler, 0)


class Renamed:
    """Another library's loop, as the sweep sees it: here difforge's euler under a new name."""

    name, family = "other-euler", "other"

    def __init__(self, model):
        self.inner = DifforgeMethod(model, "euler", guidance=1.0)

    def nfe(self, steps):
        return steps

    def draw(self, steps, labels, seeds):
        return self.inner.draw(steps, labels, seeds)

    def describe(self, steps):
        return {"library": "other", "steps": steps}


def test_sweep_scores_every_sampler_at_every_budget_and_plots(model, refs, tmp_path):
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    r = nfe_sweep(
        model, samplers=("euler", "heun"), nfe=(3, 4), n=N, guidance=1.0, reference_sampler="euler",
        reference_steps=5, methods=[Renamed(model)], out=out, plot=plot, threads=1, **refs,
    )  # fmt: skip
    got = [(p["method"], p["target_nfe"], p["steps"], p["nfe"]) for p in r["points"]]
    assert got == [
        ("euler", 3, 3, 3), ("euler", 4, 4, 4),
        ("other-euler", 3, 3, 3), ("other-euler", 4, 4, 4),
    ]  # fmt: skip
    # a budget of 4 buys Heun no more than 2 steps (3 NFE), where it is known to fail
    assert [(p["method"], p["target_nfe"], p["steps"]) for p in r["left_out"]] == [
        ("heun", 3, 2), ("heun", 4, 2)
    ]  # fmt: skip
    assert all("shrinks sigma" in p["why"] for p in r["left_out"])
    for p in r["points"]:
        assert p["metrics"]["fid"] > 0 and p["metrics"]["label_accuracy"] is not None
    by = {(p["method"], p["steps"]): p["metrics"] for p in r["points"]}
    assert by[("other-euler", 3)] == by[("euler", 3)]  # same noise, same labels: paired points
    ref = r["reference_line"]
    assert (ref["method"], ref["steps"], ref["nfe"]) == ("euler", 5, 5)
    assert r["num_samples"] == N and r["model"]["sha256"] == model.sha256
    on_disk = json.loads(out.read_text())
    assert len(on_disk["points"]) == 4 and on_disk["reference_line"]["nfe"] == 5
    assert len(on_disk["left_out"]) == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_diffusers_adapter_reproduces_difforge_ddim(model, guidance):
    """benchmarks/quality_vs_nfe.py's eps adapter: diffusers' DDIM loop over it equals difforge's
    DDIM on the same sigma grid (started from the same VP noise), guided or not."""
    diffusers = pytest.importorskip("diffusers")
    from benchmarks.quality_vs_nfe import SCHEDULE, VPEpsAdapter
    from difforge.core import CFGDenoiser, DiscreteVP
    from difforge.samplers import PerSampleNoise, sample_ddim

    labels, seeds = [0, 3, 7, 9], [1, 2, 3, 4]
    sched = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False)
    sched.set_timesteps(6)
    eps_net = VPEpsAdapter(model, guidance, labels)
    noise = PerSampleNoise(seeds).draw(model.image_shape)  # (4, 1, 28, 28)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(eps_net(sched.scale_model_input(x, t), t), t, x).prev_sample
    assert eps_net.calls == 6
    sigmas = DiscreteVP("linear").t_to_sigma(sched.timesteps.double())
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    null = {"labels": torch.full((4,), model.num_classes)}
    den = model.denoiser if guidance == 1 else CFGDenoiser(model.denoiser, guidance, null)
    with torch.no_grad():
        y = sample_ddim(
            den, noise * (1 + sigmas[0] ** 2).sqrt().float(), sigmas,
            cond={"labels": torch.tensor(labels)},
        )  # fmt: skip
    torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
