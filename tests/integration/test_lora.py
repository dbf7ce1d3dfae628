"""LoRA adapters with peft on the tiny 8x8 model: training touches only the adapters, the file
records rank / alpha / targets / base sha256, other bases are refused naming both hashes, scale 0
is the base, merged equals applied."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft", reason="LoRA adapters need peft")

from difforge.data import ImageDataset
from difforge.pipeline import load
from difforge.pipeline.adapters import AdapterMismatch, apply_adapter, load_adapter
from difforge.training.lora import LoraTrainConfig, ink, select, train_lora
from tests.integration.serving_fixtures import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def thick_data(n: int = 64) -> ImageDataset:
    """8x8 'digits': a bar whose thickness varies, labels 0-9."""
    g = torch.Generator().manual_seed(0)
    width = torch.randint(1, 5, (n,), generator=g)
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    for i, w in enumerate(width.tolist()):
        images[i, :, :, 2 : 2 + w] = 255
    return ImageDataset("bars", images, torch.arange(n) % 10, 10)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    config = LoraTrainConfig(
        name="thick", rank=2, steps=30, batch_size=8, stroke="thick", lr=5e-3,
        target_modules=("qkv", "proj"),
    )  # fmt: skip
    out = tmp_path_factory.mktemp("lora") / "thick"
    result = train_lora(model_dir, config, out, data=thick_data())
    assert 0 < result.trained_fraction < 0.05, result
    return out


def test_select_keeps_the_thickest_of_each_class():
    data = thick_data()
    sub = select(data, LoraTrainConfig(stroke="thick", stroke_fraction=0.3, classes=(1, 2, 3)))
    assert set(sub.labels.tolist()) <= {1, 2, 3}
    assert ink(sub.images).mean() > ink(data.images).mean()


def test_adapter_file_records_its_base_and_shape(adapter_dir, model_dir):
    a = load_adapter(adapter_dir)
    base = load(model_dir)
    assert (a.name, a.rank, a.alpha) == ("thick", 2, 4.0)
    assert a.target_modules == ("qkv", "proj")
    assert a.base_sha256 == base.sha256 and len(a.sha256) == 64
    assert a.tensors and all(".lora_" in k for k in a.tensors)
    assert any(t.abs().sum() > 0 for k, t in a.tensors.items() if "lora_B" in k), "B trained"
    assert a.training["subset_images"] > 0 and "README" not in a.training
    assert oct((adapter_dir / "adapter.safetensors").stat().st_mode & 0o777) == "0o644"


def test_apply_scale_and_merge(adapter_dir, model_dir):
    base, a = load(model_dir), load_adapter(adapter_dir)
    kw = {"labels": [1, 2], "seed": 3, "steps": 3}
    ref = base.sample(**kw).images
    assert torch.equal(apply_adapter(base, a, scale=0.0).sample(**kw).images, ref)
    applied = apply_adapter(base, a, scale=1.0)
    out = applied.sample(**kw).images
    assert not torch.equal(out, ref) and applied.sha256 != base.sha256
    assert applied.name == f"{base.name}+thick"
    merged = apply_adapter(base, a, scale=1.0, merge=True)
    assert not any(".lora_" in k for k in merged.net.state_dict())
    diff = (merged.sample(**kw).images.int() - out.int()).abs().max().item()
    assert diff <= 1, diff  # round-off of folding B A into W
    assert torch.equal(base.sample(**kw).images, ref), "the base model is untouched"


def test_an_adapter_is_refused_on_another_base(adapter_dir, tmp_path):
    other = load(make_tiny_model(tmp_path / "other", seed=5))
    a = load_adapter(adapter_dir)
    with pytest.raises(AdapterMismatch) as e:
        apply_adapter(other, a)
    assert a.base_sha256 in str(e.value) and other.sha256 in str(e.value)


def test_cli_trains_an_adapter_and_samples_with_it(model_dir, tmp_path, capsys):
    import json

    from difforge.cli import main
    from difforge.common.png import png_bytes, png_text

    data = thick_data(20)
    for i, (img, label) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = tmp_path / "bars" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png_bytes(img))
    spec = json.dumps(
        {"kind": "folder", "path": str(tmp_path / "bars"), "size": 8, "mode": "grayscale"}
    )
    out = tmp_path / "adapter"
    argv = ["train-lora", "--model", str(model_dir), "--out", str(out), "--dataset", spec]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--steps", "3", "--batch-size", "4", "--rank", "2", "--targets", "qkv,proj"])
    assert e.value.code == 0
    assert "trained parameters" in capsys.readouterr().out
    assert load_adapter(out).rank == 2
    grid = tmp_path / "grid.png"
    sample = ["sample", "--model", str(model_dir), "--labels", "1", "--seed", "1", "--steps", "2"]
    with pytest.raises(SystemExit) as e:
        main([*sample, "--adapter", str(out), "--adapter-scale", "0.5", "--out", str(grid)])
    assert e.value.code == 0
    assert png_text(grid.read_bytes())["model"].endswith("+lora")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--stroke", "bold"])
    assert e.value.code == 2 and "stroke" in capsys.readouterr().err


def test_serving_a_base_with_adapters_never_mixes_them_in_a_call(adapter_dir, model_dir):
    import asyncio
    import base64

    import numpy as np

    from difforge.common.png import png_pixels
    from difforge.pipeline.adapters import attach_adapter
    from difforge.serving import ModelRouter, ModelVersion, Service, ServiceConfig
    from tests.integration.serving_fixtures import run, running

    model = load(model_dir)
    a = load_adapter(adapter_dir)
    attach_adapter(model, a, name="thick")
    attach_adapter(model, a, name="half", scale=0.5)
    config = ServiceConfig(audit_db=":memory:", torch_threads=1, warmup_steps=1, batch_wait_ms=400)
    svc = Service(config, ModelRouter(ModelVersion(model)))

    def px(body):
        return [png_pixels(base64.b64decode(i["png_base64"])) for i in body["images"]]

    async def scenario():
        async with running(svc) as c:
            body = {"labels": [2], "seed": 5, "response_format": "json"}
            alone = {}
            for name in ("thick", "half", None):
                r = await c.post("/v1/generate", json={**body, "adapter": name})
                assert r.status_code == 200, r.text
                alone[name] = px(r.json())[0]
            assert not np.array_equal(alone["thick"], alone[None])
            assert r.json().get("adapter") is None
            crowd = [{**body, "adapter": name} for name in ("thick", "half", None, "thick")]
            rs = await asyncio.gather(*[c.post("/v1/generate", json=b) for b in crowd])
            out = [r.json() for r in rs]
            assert [o["batch_images"] for o in out] == [[2], [1], [1], [2]]
            for o, name in zip(out, ("thick", "half", None, "thick"), strict=True):
                assert np.array_equal(px(o)[0], alone[name]), name
            assert out[0]["adapter"] == {"name": "thick", "sha256": a.sha256, "scale": 1.0}
            bad = await c.post("/v1/generate", json={**body, "adapter": "nope"})
            assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "adapter"]

    run(scenario())


def test_build_service_attaches_adapters_and_lists_them(adapter_dir, model_dir):
    from difforge.cli.serve import _adapter_spec
    from difforge.serving import ServiceConfig, create_app  # noqa: F401  (the app module)
    from difforge.serving.app import build_service
    from tests.integration.serving_fixtures import run, running

    spec = _adapter_spec(f"thick={adapter_dir}@0.5")
    assert spec == ("thick", str(adapter_dir), 0.5)
    assert _adapter_spec(f"t={adapter_dir}") == ("t", str(adapter_dir), 1.0)
    import typer

    with pytest.raises(typer.Exit):
        _adapter_spec("no-equals-sign")
    config = ServiceConfig(audit_db=":memory:", torch_threads=1, warmup_steps=1)
    svc = build_service(model_dir, config, [spec])

    async def scenario():
        async with running(svc) as c:
            listed = (await c.get("/v1/models")).json()["models"][0]["adapters"]
            assert listed == [
                {"name": "thick", "sha256": load_adapter(adapter_dir).sha256, "scale": 0.5}
            ]
            r = await c.post("/v1/generate", json={"labels": [1], "seed": 1, "adapter": "thick"})
            assert r.status_code == 200

    run(scenario())


def test_cli_serve_passes_adapters(model_dir, monkeypatch):
    from typer.testing import CliRunner

    import difforge.serving
    from difforge.cli import app

    calls = []
    monkeypatch.setattr(difforge.serving, "serve", lambda *a, **kw: calls.append((a, kw)))
    args = ["serve", "--model", str(model_dir), "--adapter", "a=/x@0.5", "--adapter", "b=/y"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls[0][1]["adapters"] == [("a", "/x", 0.5), ("b", "/y", 1.0)]


def test_adapters_run_with_the_models_invariant_kernels(adapter_dir, model_dir):
    """Attached before or after with_backend(kernels="invariant"), an adapter samples with the
    batch-invariant kernels: its images do not depend on the batch."""
    from difforge.nets.invariant import is_batch_invariant
    from difforge.pipeline.adapters import attach_adapter

    before = load(model_dir)
    attach_adapter(before, load_adapter(adapter_dir), name="early")
    model = before.with_backend("eager", kernels="invariant")
    attach_adapter(model, load_adapter(adapter_dir), name="late")
    assert not is_batch_invariant(before.adapters["early"].denoiser)  # the original is kept
    for name in ("early", "late"):
        assert is_batch_invariant(model.adapters[name].denoiser)
    kwargs = {"adapter": "late", "steps": 3, "guidance": 2.0}
    from difforge.pipeline import resolve

    plan = resolve(model, {"labels": [1, 2, 3], "seed": 4, **kwargs})
    x, _ = model.sample_latents(plan.rows, plan)
    alone = resolve(model, {"labels": [2], "seed": 5, **kwargs})
    assert torch.equal(x[1:2], model.sample_latents(alone.rows, alone)[0])
