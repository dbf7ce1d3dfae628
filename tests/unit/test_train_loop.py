"""The training loop on a tiny U-Net: learning, exact resume, crash-safe checkpoints, NaN guard."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from difforge.data import ImageDataset
from difforge.training import (
    CheckpointError,
    NonFiniteTrainingError,
    Trainer,
    latest_checkpoint,
    list_checkpoints,
    parse_config,
    read_checkpoint,
    train,
    write_checkpoint,
)
from difforge.training.losses import denoising_loss, sample_sigma
from tests.helpers import TINY_NET

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dataset(n: int = 48, seed: int = 0) -> ImageDataset:
    """Class k is a bright k-th horizontal band plus noise: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.full((n, 1, 8, 8), 40.0)
    for i, k in enumerate(labels.tolist()):
        images[i, 0, 2 * k : 2 * k + 3] = 220.0
    images += 20 * torch.randn(images.shape, generator=g)
    return ImageDataset("bands", images.clamp(0, 255).to(torch.uint8), labels, 3)


def tiny_config(**overrides):
    base = {
        "net": TINY_NET,
        "dataset": "bands",
        "batch_size": 8,
        "max_steps": 10,
        "log_every": 2,
        "checkpoint_every": 5,
        "keep_last": 5,
        "sampling": {"steps": 3},
        "optim": {"lr": 2e-3, "warmup_steps": 3, "schedule": "cosine"},
        "ema": {"halflife_images": 64},
        "max_nonfinite": 3,
    }
    base.update(overrides)
    return parse_config(base)


def fixed_batch_loss(trainer: Trainer, seed: int = 123) -> float:
    g = torch.Generator().manual_seed(seed)
    x0 = trainer.data[:24]
    cond = trainer.spec.from_batch({k: v[:24] for k, v in trainer.fields.items()})
    sigma = sample_sigma(trainer.config, trainer.process, 24, g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        loss = denoising_loss(trainer.denoiser, x0, sigma, eps, cond, trainer.config)
    return float(loss)


def test_a_few_dozen_steps_reduce_the_loss(tmp_path):
    trainer = Trainer(tiny_config(max_steps=30, optim={"lr": 5e-3}), tiny_dataset(), tmp_path)
    before = fixed_batch_loss(trainer)
    for _ in range(30):
        trainer.train_step(*trainer.next_batch())
    after = fixed_batch_loss(trainer)
    assert trainer.state.step == 30
    assert after < 0.7 * before, (before, after)


def _final_payload(run_dir):
    tensors, state = read_checkpoint(latest_checkpoint(run_dir))
    counters = dict(state["state"], elapsed_s=None)
    return tensors, counters, state["step"]


def test_resume_is_exact(tmp_path):
    cfg, data = tiny_config(sample_every=5), tiny_dataset()
    straight = train(cfg, tmp_path / "a", dataset=data, progress=False)
    first = train(cfg, tmp_path / "b", dataset=data, until_step=5, progress=False)
    assert (straight.status, first.status, first.step) == ("completed", "stopped", 5)
    torch.rand(7)  # disturb every global RNG the loop might read; resume must restore them
    second = train(cfg, tmp_path / "b", dataset=data, resume=True, progress=False)
    assert second.step == straight.step == 10
    ta, ca, sa = _final_payload(tmp_path / "a")
    tb, cb, sb = _final_payload(tmp_path / "b")
    assert sa == sb and ca == cb
    assert set(ta) == set(tb)
    assert any(k.startswith("optim.") for k in ta) and "rng.torch" in ta
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert different == []
    sha = [json.loads((tmp_path / r / "model/manifest.json").read_text()) for r in "ab"]
    assert sha[0]["files"]["model.safetensors"] == sha[1]["files"]["model.safetensors"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/metrics.jsonl").open()]
    assert steps == sorted(set(steps))  # no duplicated log lines across the resume


def test_partial_and_corrupted_checkpoints_are_ignored(tmp_path):
    cfg, data = tiny_config(), tiny_dataset()
    train(cfg, tmp_path, dataset=data, until_step=5, progress=False)
    good = latest_checkpoint(tmp_path)
    root = tmp_path / "checkpoints"
    # Killed mid-write: a temp folder, a published folder without marker, a bad-hash marker.
    (root / ".tmp-step-000000011-99999").mkdir()
    (root / ".tmp-step-000000011-99999" / "tensors.safetensors").write_bytes(b"\0" * 10)
    (root / "step-000000010").mkdir()
    (root / "step-000000010" / "state.json").write_text("{}")
    torn = root / "step-000000009"
    torn.mkdir()
    for f in good.iterdir():
        (torn / f.name).write_bytes(f.read_bytes())
    (torn / "tensors.safetensors").write_bytes(
        good.joinpath("tensors.safetensors").read_bytes()[:100]
    )
    assert latest_checkpoint(tmp_path) == good
    result = train(cfg, tmp_path, dataset=data, resume=True, progress=False)
    assert result.step == 10
    assert not (root / ".tmp-step-000000011-99999").exists()  # stale temp folders are removed


def test_keep_last_k(tmp_path):
    train(
        tiny_config(checkpoint_every=2, keep_last=2),
        tmp_path,
        dataset=tiny_dataset(),
        progress=False,
    )
    assert [step for step, _ in list_checkpoints(tmp_path)] == [8, 10]


def test_resume_refuses_a_different_config_or_dataset(tmp_path):
    data = tiny_dataset()
    train(tiny_config(), tmp_path, dataset=data, until_step=5, progress=False)
    changed = tiny_config(optim={"lr": 4e-3, "warmup_steps": 3, "schedule": "cosine"})
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.002 -> 0\.004"):
        train(changed, tmp_path, dataset=data, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="dataset content hash"):
        train(tiny_config(), tmp_path, dataset=tiny_dataset(seed=1), resume=True, progress=False)
    with pytest.raises(Exception, match="--resume"):
        train(tiny_config(), tmp_path, dataset=data, progress=False)
    forced = train(
        changed, tmp_path, dataset=data, resume=True, force=True, until_step=7, progress=False
    )
    assert forced.step == 7


def test_nonfinite_step_changes_nothing_but_the_counters(tmp_path):
    trainer = Trainer(tiny_config(), tiny_dataset(), tmp_path, log=lambda _: None)
    for _ in range(2):
        trainer.train_step(*trainer.next_batch())
    before, _ = trainer.checkpoint_payload()
    x0, labels = trainer.next_batch()
    x0[0, 0, 0, 0] = float("nan")
    outcome = trainer.train_step(x0, labels)
    after, _ = trainer.checkpoint_payload()
    assert outcome.skipped
    assert (trainer.state.step, trainer.state.nonfinite_total, trainer.state.nonfinite_streak) == (
        2,
        1,
        1,
    )
    model_keys = [k for k in before if not k.startswith("rng.")]
    assert all(torch.equal(before[k], after[k]) for k in model_keys)
    trainer.train_step(*trainer.next_batch())  # a good step resets the streak
    assert (trainer.state.nonfinite_total, trainer.state.nonfinite_streak) == (1, 0)


def test_training_stops_after_k_nonfinite_steps_in_a_row(tmp_path):
    trainer = Trainer(tiny_config(), tiny_dataset(), tmp_path, log=lambda _: None)
    trainer.data[:] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="3 steps in a row"):
        trainer.run(progress=False)
    assert trainer.state.nonfinite_total == 3
    assert list_checkpoints(tmp_path) == []


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    with pytest.raises(CheckpointError, match="non-finite"):
        write_checkpoint(tmp_path, 1, {"net.w": torch.tensor([1.0, float("inf")])}, {}, 3)
    assert list_checkpoints(tmp_path) == []


def test_sigterm_checkpoints_and_stops(tmp_path):
    trainer = Trainer(tiny_config(), tiny_dataset(), tmp_path)
    step = trainer.train_step

    def step_then_signal(*args):
        out = step(*args)
        if trainer.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal
    result = trainer.run(progress=False)
    assert (result.status, result.step, result.model_dir) == ("interrupted", 3, None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_time_budget_stops_cleanly_with_artifacts(tmp_path):
    result = train(
        tiny_config(), tmp_path, dataset=tiny_dataset(), max_minutes=1e-9, progress=False
    )
    assert result.status == "time_budget" and result.step == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert latest_checkpoint(tmp_path) is not None


def test_run_outputs(tmp_path):
    result = train(tiny_config(sample_every=10), tmp_path, dataset=tiny_dataset(), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(2, 11, 2))
    assert {"loss", "lr", "grad_norm", "ema_beta", "sec_per_step"} <= set(rows[0])
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "samples/step-000000010.png").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 10
    assert result.loss == pytest.approx(rows[-1]["loss"])


def test_bf16_autocast_trains(tmp_path):
    trainer = Trainer(tiny_config(precision="bf16"), tiny_dataset(), tmp_path)
    outcomes = [trainer.train_step(*trainer.next_batch()) for _ in range(3)]
    assert not any(o.skipped for o in outcomes) and trainer.state.step == 3
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())


def test_unconditional_dataset(tmp_path):
    data = tiny_dataset()
    unlabelled = ImageDataset("bands-unlabelled", data.images, None, 0)
    net = {"kind": "unet", "config": dict(TINY_NET["config"], num_classes=0)}
    result = train(tiny_config(net=net, max_steps=2), tmp_path, dataset=unlabelled, progress=False)
    import difforge

    model = difforge.load(result.model_dir)
    samples = model.sample(n=2, steps=2)
    assert model.num_classes == 0 and samples.labels is None and samples.images.shape[0] == 2


def test_a_net_that_does_not_fit_the_data_is_refused(tmp_path):
    net = {"kind": "unet", "config": dict(TINY_NET["config"], num_classes=10)}
    with pytest.raises(ValueError, match="num_classes is 10 but the dataset has 3"):
        Trainer(tiny_config(net=net), tiny_dataset(), tmp_path)
