"""Golden full-loop values: every registered sampler, four fixed setups, a few summary numbers.

Setups (SETUPS below; stored under "config" in sampler_golden.json so a changed setup is seen):
  gmm_f64  the exact denoiser of a 16-d two-component Gaussian mixture, the sampler function called
           directly on a float64 state (tolerance 1e-10: only float64 round-off may move it);
  gmm_f32  the same denoiser through `sample()` (float32 state, per-sample seeds);
  net_f32  a tiny seeded conv net (tests/helpers.py) read as an x0 predictor on DiscreteVP,
           through `sample()` with class labels and guidance 2, i.e. through CFGDenoiser
           (tolerance 2e-5: float32 round-off of conv kernels may differ between CPUs);
  edit_f32 the GMM through `sample()` editing fixed images: init + start, an Inpaint step hook
           and RePaint resampling (the first values are kept pixels; the sum sees the hole).
Summary numbers per output x (B, ...): sum, sum of |x|, the first 4 and the last 2 values.

A change that moves these numbers is a behaviour change: explain it in the commit and regenerate
    OMP_NUM_THREADS=1 .venv/bin/python -m tests.golden.test_sampler_golden --update
(from the repository root; it rewrites tests/golden/sampler_golden.json). A newly registered
sampler needs the same command before `test_every_sampler_has_golden_values` passes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from difforge.core import DiscreteVP, Inpaint, ModelDenoiser
from difforge.samplers import SAMPLERS, PerSampleNoise, get_sigmas, sample
from tests.helpers import GaussianMixture, TinyEpsNet

GOLDEN = Path(__file__).with_name("sampler_golden.json")
SEEDS = [0, 1, 2**40]
SETUPS = {
    "gmm_f64": {"grid": ["karras", 8, 0.002, 80.0], "shape": [1, 4, 4], "tol": 1e-10},
    "gmm_f32": {"grid": ["karras", 8, 0.002, 80.0], "shape": [1, 4, 4], "tol": 2e-5},
    "net_f32": {"grid": ["karras", 6, "DiscreteVP"], "shape": [1, 6, 6], "tol": 2e-5,
                "labels": [1, 2, 3], "null_label": 10, "guidance": 2.0},
    "edit_f32": {"grid": ["karras", 8, 0.002, 80.0], "shape": [1, 4, 4], "tol": 2e-5,
                 "start": 2, "hole": [1, 3], "resample": [2, 2]},
}  # fmt: skip
# Non-default knobs that take other code paths (churn, lower orders, partial noise).
EXTRA = [
    ("euler", {"s_churn": 2.0}),
    ("heun", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 10.0}),
    ("ddim", {"eta": 0.5}),
    ("dpmpp_2m_sde", {"eta": 0.5}),
    ("ipndm", {"max_order": 2}),
]
GMM = GaussianMixture([[-1.0] * 16, [1.5] * 16], [0.3, 0.6], [0.4, 0.6])


def case_key(name: str, knobs: dict) -> str:
    return name + (
        "[" + ",".join(f"{k}={v}" for k, v in sorted(knobs.items())) + "]" if knobs else ""
    )


def cases() -> dict[str, tuple[str, dict]]:
    return {case_key(n, k): (n, k) for n, k in [(n, {}) for n in SAMPLERS] + EXTRA}


def grid(setup: str) -> torch.Tensor:
    kind, n, *rng = SETUPS[setup]["grid"]
    return (
        get_sigmas(kind, n, process=DiscreteVP())
        if rng == ["DiscreteVP"]
        else get_sigmas(kind, n, *rng)
    )


def run(setup: str, name: str, knobs: dict) -> torch.Tensor:
    cfg, sig = SETUPS[setup], grid(setup)
    if setup == "gmm_f64":
        noise = PerSampleNoise(SEEDS)  # one stream: the initial draw, then the steps' (as sample)
        x = noise.draw(cfg["shape"]).double() * sig[0].item()
        return SAMPLERS[name](GMM, x, sig, noise=noise, **knobs)
    if setup == "edit_f32":  # img2img + inpainting + RePaint resampling, all through sample()
        known = torch.linspace(-1, 1, len(SEEDS) * 16).reshape(len(SEEDS), *cfg["shape"])
        mask = torch.zeros(1, *cfg["shape"])
        lo, hi = cfg["hole"]
        mask[..., lo:hi, lo:hi] = 1
        hook = Inpaint(known, mask, PerSampleNoise(SEEDS).stream(1))
        return sample(
            GMM, sig, shape=cfg["shape"], seeds=SEEDS, sampler=name, init=known,
            start=cfg["start"], step_hook=hook, resample=tuple(cfg["resample"]), **knobs,
        ).x  # fmt: skip
    if setup == "gmm_f32":
        return sample(GMM, sig, shape=cfg["shape"], seeds=SEEDS, sampler=name, **knobs).x
    net = ModelDenoiser(TinyEpsNet(seed=0), DiscreteVP(), "x0")  # tanh output: bounded x0_hat
    b = len(SEEDS)
    return sample(
        net, sig, shape=cfg["shape"], seeds=SEEDS, sampler=name,
        cond={"labels": torch.tensor(cfg["labels"])},
        uncond={"labels": torch.full((b,), cfg["null_label"])}, guidance=cfg["guidance"], **knobs,
    ).x  # fmt: skip


def summary(x: torch.Tensor) -> dict[str, object]:
    flat = x.double().flatten()
    return {
        "sum": flat.sum().item(),
        "abs_sum": flat.abs().sum().item(),
        "head": flat[:4].tolist(),
        "tail": flat[-2:].tolist(),
    }


def compute() -> dict:
    with torch.no_grad():
        values = {
            key: {setup: summary(run(setup, n, k)) for setup in SETUPS}
            for key, (n, k) in cases().items()
        }
    return {"config": {"seeds": SEEDS, "setups": SETUPS}, "values": values}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_stored_config_is_the_current_one(golden):
    assert golden["config"] == json.loads(json.dumps({"seeds": SEEDS, "setups": SETUPS}))


def test_every_sampler_has_golden_values(golden):
    missing = sorted(set(cases()) - set(golden["values"]))
    assert not missing, f"no golden values for {missing}: regenerate (see module docstring)"


@pytest.mark.parametrize("key", sorted(cases()))
def test_golden_full_loop(key, golden):
    name, knobs = cases()[key]
    if key not in golden["values"]:
        pytest.skip(f"{key}: no golden values yet (test_every_sampler_has_golden_values fails)")
    with torch.no_grad():
        for setup, cfg in SETUPS.items():
            got, want = summary(run(setup, name, knobs)), golden["values"][key][setup]
            for field, value in want.items():
                assert got[field] == pytest.approx(value, rel=cfg["tol"], abs=cfg["tol"]), (
                    f"{key} {setup} {field}"
                )


def test_stored_float32_run_tracks_float64(golden):
    """A property of the stored numbers: the float32 loop stays within 1e-4 of the float64 one."""
    for key, v in golden["values"].items():
        f32, f64 = v["gmm_f32"], v["gmm_f64"]
        assert abs(f32["sum"] - f64["sum"]) <= 1e-4 * f64["abs_sum"], key
        assert f32["head"] == pytest.approx(f64["head"], abs=1e-4), key


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.golden.test_sampler_golden --update")
    torch.set_num_threads(1)
    GOLDEN.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(cases())} cases)")
