"""Distilled students (difforge.training.distill): guidance input, losses, folders, sampling."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import difforge
from difforge.core.denoiser import EDMPrecond
from difforge.core.sigmas import get_sigmas
from difforge.samplers import sample_heun
from difforge.training.distill import (
    DistillConfig,
    consistency_levels,
    consistency_loss,
    distill,
    guidance_loss,
    level_weights,
    progressive_loss,
    rho_between,
    student_net,
    teacher_fn,
)
from tests.distill_fixtures import make_student, make_teacher, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("distill") / "teacher")


@pytest.fixture(scope="module")
def student_path(teacher_path) -> Path:
    return make_student(teacher_path, teacher_path.parent / "student")


def test_zero_init_student_equals_teacher_conditional(teacher_path):
    teacher = difforge.load(teacher_path)
    student = EDMPrecond(student_net(teacher).eval(), teacher.config.sigma_data)
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.5, 5.0, 80.0])
    labels = torch.tensor([0, 3, 7, 10])
    want = teacher.denoiser(x, sigma, {"labels": labels})
    for w in (1.0, 2.5, 4.0):
        got = student(x, sigma, {"labels": labels, "guidance": torch.full((4,), w)})
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and a trained guidance embedding does change the output
    torch.nn.init.normal_(student.net.guidance_embed.mlp[-1].weight)
    got = student(x, sigma, {"labels": labels, "guidance": torch.full((4,), 3.0)})
    assert (got - want).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["guidance", "progressive", "consistency"])
def test_one_step_reduces_the_loss(teacher_path, method):
    teacher = difforge.load(teacher_path)
    torch.manual_seed(0)
    net = student_net(teacher).train()
    # perturb so the guided target is not already matched (zero-init gives w-independent output)
    student = EDMPrecond(net, teacher.config.sigma_data)
    cfg = DistillConfig(method=method, teacher=str(teacher_path), student_steps=2)
    guided = teacher_fn(teacher)
    images, labels = tiny_data(16)
    x0 = images.float() / 127.5 - 1
    grid = get_sigmas("karras", 2, process=teacher.process)

    def loss() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)  # the same sigmas, w and noise every time
        if method == "guidance":
            return guidance_loss(student, guided, x0, labels, gen, cfg)
        if method == "consistency":
            levels = consistency_levels(cfg, 0.002, 80.0)
            return consistency_loss(
                student, guided, x0, labels, gen, cfg, levels, level_weights(levels, cfg)
            )
        return progressive_loss(student, guided, x0, labels, gen, cfg, grid)

    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert before > 0
    assert after < before


@pytest.mark.parametrize("substeps", [2, 4])
def test_progressive_target_is_k_teacher_euler_steps(teacher_path, substeps):
    """The loss is zero for a student whose one Euler step lands where K teacher steps land."""
    teacher = difforge.load(teacher_path)
    guided = teacher_fn(teacher)
    grid = torch.tensor([3.0, 0.5, 0.0], dtype=torch.float64)
    cfg = DistillConfig(method="progressive", teacher=str(teacher_path), teacher_substeps=substeps)
    x0, lab = torch.zeros(2, 1, 8, 8), torch.tensor([4, 5])
    gen = torch.Generator().manual_seed(3)  # replay the loss's draws: step index, w, noise
    i = torch.randint(0, 2, (2,), generator=gen)
    w = 1.0 + 3.0 * torch.rand(2, generator=gen)
    s, s_next = grid[i].float(), grid[i + 1].float()
    x = s.view(2, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    levels = [s] + [rho_between(s, s_next, j / substeps) for j in range(1, substeps)] + [s_next]
    assert all((a > b).all() for a, b in itertools.pairwise(levels))
    with torch.no_grad():
        y = x
        for a, b in itertools.pairwise(levels):
            a4, b4 = a.view(2, 1, 1, 1), b.view(2, 1, 1, 1)
            y = y + (b4 - a4) * (y - guided(y, a, lab, w)) / a4
        s4, n4 = s.view(2, 1, 1, 1), s_next.view(2, 1, 1, 1)
        target = x - s4 / (n4 - s4) * (y - x)

    class Exact:
        sigma_data = 0.5

        def __call__(self, xx, sigma, cond):
            assert torch.equal(xx, x) and torch.equal(cond["guidance"], w)
            return target

    loss = progressive_loss(Exact(), guided, x0, lab, torch.Generator().manual_seed(3), cfg, grid)
    assert float(loss) < 1e-8


def test_consistency_levels_and_ict_weights():
    cfg = DistillConfig(method="consistency", teacher="t", cd_levels=18)
    levels = consistency_levels(cfg, 0.002, 80.0)
    assert levels.dtype == torch.float64 and levels.shape == (18,)
    torch.testing.assert_close(levels[[0, -1]], torch.tensor([0.002, 80.0], dtype=torch.float64))
    assert (levels.diff() > 0).all()
    p = level_weights(levels, cfg)
    assert p.shape == (17,) and (p > 0).all() and abs(float(p.sum()) - 1) < 1e-12
    # iCT's log-normal: the most likely pair straddles exp(P_mean) = 0.33, the ends are rare
    top = int(p.argmax())
    assert levels[top] <= 2.0 and levels[top + 1] >= 0.1 and p[-1] < p[top] / 20


def test_consistency_loss_is_ict_on_one_heun_step(teacher_path):
    """The loss, replayed: pair n ~ weights, w, noise; x_hat = the samplers' Heun step of the guided
    teacher from sigma_{n+1} to sigma_n; pseudo-Huber / (sigma_{n+1} - sigma_n)."""
    teacher = difforge.load(teacher_path)
    guided = teacher_fn(teacher)
    cfg = DistillConfig(method="consistency", teacher=str(teacher_path), cd_levels=6)
    levels = consistency_levels(cfg, 0.002, 80.0)
    weights = level_weights(levels, cfg)
    x0, lab = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([4, 5, 6])

    def f(x, sigma, cond):  # a stand-in consistency function, checked in the replay too
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + cond["guidance"].view(-1, 1, 1, 1)

    f.sigma_data = 0.5
    got = consistency_loss(
        f, guided, x0, lab, torch.Generator().manual_seed(5), cfg, levels, weights
    )
    gen = torch.Generator().manual_seed(5)
    n = torch.multinomial(weights, 3, replacement=True, generator=gen)
    w = 1.0 + 3.0 * torch.rand(3, generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    want = []
    for k in range(3):
        s_lo, s_hi = float(levels[n[k]]), float(levels[n[k] + 1])
        x = x0[k : k + 1] + torch.tensor(s_hi).float() * z[k : k + 1]
        one = lambda xx, sig, c=None, k=k: guided(xx, sig, lab[k : k + 1], w[k : k + 1])  # noqa: E731
        x_hat = sample_heun(one, x, torch.tensor([s_hi, s_lo], dtype=torch.float64))
        cond = {"guidance": w[k : k + 1]}
        diff = f(x, torch.tensor([s_hi]).float(), cond) - f(
            x_hat, torch.tensor([s_lo]).float(), cond
        )
        c = 0.00054 * 8  # sqrt(64)
        want.append((torch.sqrt(diff.square().sum() + c * c) - c) / (s_hi - s_lo))
    torch.testing.assert_close(got, torch.stack(want).mean(), rtol=1e-4, atol=1e-6)


def test_teacher_fn_is_cfg(teacher_path):
    teacher = difforge.load(teacher_path)
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    lab, w = torch.tensor([1, 2]), torch.tensor([3.0, 3.0])
    c = teacher.denoiser(x, s, {"labels": lab})
    u = teacher.denoiser(x, s, {"labels": torch.full((2,), 10)})
    torch.testing.assert_close(teacher_fn(teacher)(x, s, lab, w), u + 3.0 * (c - u))


def test_student_folder_names_its_teacher(teacher_path, student_path):
    teacher, student = difforge.load(teacher_path), difforge.load(student_path)
    prov = student.config.provenance
    assert prov["teacher"] == {"name": "tiny-teacher", "sha256": teacher.sha256}
    assert prov["distilled_from"]["sha256"] == teacher.sha256
    assert prov["distillation"]["method"] == "progressive"
    assert prov["distillation"]["steps_done"] == 3
    assert student.guidance_input and not teacher.guidance_input
    s = student.sampling
    assert (s.sampler, s.steps, s.guidance) == ("euler", 2, 2.0)
    # a second round keeps the shipped teacher and records the chain
    cfg = DistillConfig(
        method="progressive", teacher=str(student_path), steps=1, batch_size=4, student_steps=1
    )
    again = difforge.load(distill(cfg, student_path.parent / "s2", data=tiny_data(8), log=print))
    assert again.config.provenance["teacher"]["sha256"] == teacher.sha256
    lineage = [p["sha256"] for p in again.config.provenance["lineage"]]
    assert lineage == [student.sha256, teacher.sha256]


def test_student_one_forward_per_step_and_same_bytes_alone(student_path):
    student = difforge.load(student_path)
    calls = []
    hook = student.net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        batch = student.sample(labels=[1, 2, 3], seeds=[5, 6, 7], guidance=3.0)
    finally:
        hook.remove()
    assert batch.nfe == 2 and calls == [3, 3]  # no doubled cond/null batch
    alone = student.sample(labels=[2], seeds=[6], guidance=3.0)
    assert torch.equal(alone.images[0], batch.images[1])
    other_w = student.sample(labels=[2], seeds=[6], guidance=1.0)
    assert other_w.images.shape == alone.images.shape


def test_bad_config_is_refused(teacher_path):
    with pytest.raises(ValueError, match="guidance_range"):
        DistillConfig(method="guidance", teacher=str(teacher_path), guidance_range=(3.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        DistillConfig(method="consistent", teacher=str(teacher_path))
    with pytest.raises(ValueError, match="sampler 'consistency'"):
        DistillConfig(method="consistency", teacher=str(teacher_path), sampler="euler")
    with pytest.raises(ValueError, match="karras"):
        DistillConfig(method="progressive", teacher=str(teacher_path), grid="vp_time")
    with pytest.raises(ValueError, match="cd_levels"):
        DistillConfig(method="consistency", teacher=str(teacher_path), cd_levels=1)


def test_consistency_student_folder_and_sampling(teacher_path, tmp_path):
    cfg = DistillConfig(
        method="consistency", teacher=str(teacher_path), steps=2, batch_size=4, student_steps=2,
        grid="vp_time_mid", cd_levels=6, ema_halflife_steps=0,
    )  # fmt: skip
    student = difforge.load(distill(cfg, tmp_path / "cd", data=tiny_data(8), log=print))
    s = student.sampling
    assert (s.sampler, s.steps, s.grid, s.guidance) == ("consistency", 2, "vp_time_mid", 2.0)
    prov = student.config.provenance
    assert (
        prov["distillation"]["method"] == "consistency" and prov["distillation"]["cd_levels"] == 6
    )
    assert prov["teacher"]["sha256"] == difforge.load(teacher_path).sha256
    batch = student.sample(labels=[1, 2], seeds=[5, 6])
    assert batch.nfe == 2
    alone = student.sample(labels=[2], seeds=[6])
    assert torch.equal(alone.images[0], batch.images[1])


def test_cli_distill_refuses_bad_input_in_one_line(teacher_path, tmp_path, capsys):
    from difforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["distill", "consistent", "--teacher", str(teacher_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "consistency" in err
    with pytest.raises(SystemExit) as e:
        main(["distill", "guidance", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err
