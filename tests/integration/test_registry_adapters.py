"""LoRA adapters as registry versions tied to their base (SQLite and PostgreSQL), the CLI, and
serving a registry base with its adapters (requests name them; a canary keeps its own)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import text
from typer.testing import CliRunner

pytest.importorskip("peft", reason="LoRA adapters need peft")

from difforge.cli import app
from difforge.pipeline import load
from difforge.pipeline.adapters import (
    AdapterMismatch,
    apply_adapter,
    inject_lora,
    load_adapter,
    save_adapter,
)
from difforge.registry import ArtifactIntegrityError, ConflictError, Registry
from difforge.registry.adapters import (
    current_adapters,
    list_adapters,
    load_registered,
    push_adapter,
)
from difforge.serving import ServiceConfig
from difforge.serving.config import RegistryFollow
from difforge.serving.registry_source import open_service
from tests.integration.serving_fixtures import make_tiny_model, running
from tests.integration.test_registry import (  # noqa: F401  (fixtures)
    drop_append_only_guard,
    open_registry,
    reg,
    registry_url,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "tiny"
TARGETS = ("qkv", "proj")
MANUAL = RegistryFollow(poll_s=3600, check_s=3600, retry_failed_s=3600)
KW = {"labels": [1, 2], "seed": 3, "steps": 3}


def make_adapter(folder: Path, base: Path, seed: int, name: str = "thick") -> Path:
    """An adapter of `base` with random (non-zero) LoRA B: it changes the base's outputs."""
    model = load(base)
    net = inject_lora(model.net, 2, 4.0, TARGETS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in net.named_parameters():
            if ".lora_B." in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return save_adapter(
        folder, net, name=name, rank=2, alpha=4.0, target_modules=TARGETS,
        base_sha256=model.sha256, training={"seed": seed}, card=f"# {name}\n\nseed {seed}\n",
    )  # fmt: skip


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-bases")
    return [make_tiny_model(root / f"v{i}", seed=i, name=NAME) for i in (1, 2)]


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """thick (seed 0) and thick2 (seed 1) of v1, other (seed 2) of v2."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "thick": make_adapter(root / "thick", bases[0], 0),
        "thick2": make_adapter(root / "thick2", bases[0], 1),
        "other": make_adapter(root / "other", bases[1], 2, name="other"),
    }


def test_push_list_and_refuse_on_another_base(reg, bases, adapters):  # noqa: F811
    v1 = reg.register(bases[0], NAME).info
    v2 = reg.register(bases[1], NAME).info
    r = push_adapter(reg, adapters["thick"], NAME, 1)
    assert r.created and r.info.ref == f"{NAME}:v1/thick:v1"
    assert (r.info.base_sha256, r.info.rank, r.info.alpha) == (v1.weights_sha256, 2, 4.0)
    assert r.info.target_modules == TARGETS and r.info.card.startswith("# thick")
    assert not push_adapter(reg, adapters["thick"], NAME, "v1").created  # same file: same version
    # a retrained adapter under the same name is version 2 of that name
    again = push_adapter(reg, adapters["thick2"], NAME, 1, name="thick")
    assert (again.created, again.info.version) == (True, 2)
    with pytest.raises(ConflictError, match=r"already tiny:v1/thick:v1"):
        push_adapter(reg, adapters["thick"], NAME, 1, name="renamed")
    with pytest.raises(AdapterMismatch) as e:
        push_adapter(reg, adapters["thick"], NAME, 2)
    assert v1.weights_sha256 in str(e.value) and v2.weights_sha256 in str(e.value)
    push_adapter(reg, adapters["other"], NAME, 2, scale=0.5)

    assert [a.ref for a in list_adapters(reg, NAME)] == [
        "tiny:v1/thick:v1", "tiny:v1/thick:v2", "tiny:v2/other:v1",
    ]  # fmt: skip
    assert [(a.name, a.version) for a in current_adapters(reg, NAME, 1)] == [("thick", 2)]
    assert [(a.name, a.scale) for a in current_adapters(reg, NAME, 2)] == [("other", 0.5)]
    assert [e.action for e in reg.audit_log(NAME)].count("adapter_register") == 3
    assert reg.verify().ok

    # the stored adapter is the pushed one, to the tensor, and applies as the folder does
    stored = load_registered(reg, current_adapters(reg, NAME, 1)[0])
    direct = load_adapter(adapters["thick2"])
    assert stored.sha256 == direct.sha256
    base = reg.load_version(NAME, 1)
    got = apply_adapter(base, stored).sample(**KW).images
    assert torch.equal(got, apply_adapter(load(bases[0]), direct).sample(**KW).images)
    assert not torch.equal(got, base.sample(**KW).images)


def test_damaged_or_edited_adapters_are_found(reg, bases, adapters):  # noqa: F811
    reg.register(bases[0], NAME)
    info = push_adapter(reg, adapters["thick"], NAME, 1).info
    blob = reg.store.path(info.sha256)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-8] + b"tampered")
    with pytest.raises(ArtifactIntegrityError, match=r"adapter tiny:v1/thick:v1.*corrupted"):
        load_registered(reg, info)
    assert reg.audit_log(NAME)[-1].action == "integrity_failure"
    problems = reg.verify().problems
    assert any("adapter.safetensors of adapter thick v1 of tiny v1" in p for p in problems)
    push_adapter(reg, adapters["thick"], NAME, 1)  # pushing the folder again repairs the blob
    assert load_registered(reg, info).sha256 == info.sha256

    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE adapter_versions SET scale = 3.0"))
    problems = reg.verify().problems
    assert any("adapter thick v1 of tiny v1 was edited after it was pushed" in p for p in problems)


def test_cli_push_adapter_and_list(tmp_path, bases, adapters):
    runner = CliRunner()
    base = ["registry", "--registry", f"sqlite:///{tmp_path}/reg.db"]

    def cli(*args, code=0):
        result = runner.invoke(app, [*base, *map(str, args)])
        assert result.exit_code == code, result.output
        return result

    cli("register", bases[0], "--name", NAME)
    cli("register", bases[1], "--name", NAME)
    out = cli("push-adapter", adapters["thick"], "--base", NAME, "--base-version", "1").stdout
    assert out.startswith(f"pushed {NAME}:v1/thick:v1 (sha256 ") and "scale 1)" in out
    refused = cli("push-adapter", adapters["thick"], "--base", NAME, code=2)  # latest is v2
    line = refused.stderr.strip()
    assert line.startswith("error: adapter 'thick' was trained on base sha256 ")
    assert "refusing to push it there" in line and len(line.splitlines()) == 1
    listed = cli("adapters", NAME).stdout.splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{NAME}:v1/thick:v1\t")
    shown = json.loads(cli("adapters", NAME, "v1", "--json").stdout)
    assert shown[0]["name"] == "thick" and shown[0]["base_version"] == 1
    assert cli("adapters", NAME, "2").stdout.strip() == f"no adapters for {NAME} 2"


def _pixels(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    body = response.json()
    arrays = [Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))) for i in body["images"]]
    return torch.stack([torch.from_numpy(np.array(a)).flatten().long() for a in arrays])


def test_serving_a_base_with_its_registry_adapters(tmp_path, bases, adapters):
    registry = Registry(f"sqlite:///{tmp_path}/registry.db", actor="test")
    for folder in bases:
        registry.register(
            folder,
            NAME,
            reports=[{"num_samples": 10, "metrics": {"fid": 10.0, "memorization": 0.0}}],
        )
    registry.promote(NAME, 1, to="production", gates={"smoke_sample": False})
    push_adapter(registry, adapters["thick"], NAME, 1)
    expected = apply_adapter(load(bases[0]), load_adapter(adapters["thick"]))
    body = {"labels": [1, 2], "seed": 3, "steps": 3, "n": 2}

    async def scenario():
        config = ServiceConfig(audit_db=":memory:", registry=MANUAL, torch_threads=1)
        service, source = open_service(registry.config.url, NAME, config)
        async with running(service, "127.0.0.1", source, timeout=60) as client:
            models = (await client.get("/v1/models")).json()
            served = models["models"] if isinstance(models, dict) else models
            assert [a["name"] for a in served[0]["adapters"]] == ["thick"]
            base_px, thick_px = await asyncio.gather(
                client.post("/v1/generate", json=body),
                client.post("/v1/generate", json={**body, "adapter": "thick"}),
            )  # sent together: they must not share a batch
            assert not torch.equal(_pixels(base_px), _pixels(thick_px))
            want = expected.sample(labels=[1, 2], seed=3, steps=3).images
            assert torch.equal(_pixels(thick_px), want.reshape(2, -1).long())
            assert thick_px.json()["adapter"]["name"] == "thick"
            unknown = await client.post("/v1/generate", json={**body, "adapter": "nope"})
            assert unknown.status_code == 422 and "thick" in unknown.text

            # a canary of v2 carries v2's adapters; requests naming thick stay on production
            registry.promote(NAME, 2, to="canary", percent=100, gates={"smoke_sample": False})
            push_adapter(registry, adapters["other"], NAME, 2)
            await source.sync()
            roles = {role: v for role, v in service.router.versions()}
            assert set(roles["canary"].model.adapters) == {"other"}
            assert set(roles["production"].model.adapters) == {"thick"}
            for seed in range(6):
                r = await client.post(
                    "/v1/generate", json={**body, "seed": seed, "adapter": "thick"}
                )
                assert r.status_code == 200 and r.json()["adapter"]["name"] == "thick"
                assert r.json()["model_version"] == roles["production"].id

            # a push for the served production is picked up on the next sync
            push_adapter(registry, adapters["thick2"], NAME, 1, name="thin")
            await source.sync()
            assert set(roles["production"].model.adapters) == {"thick", "thin"}
            status = source.status()["serving"]
            assert [a["name"] for a in status[0]["adapters"]] == ["thick", "thin"]
            assert [a["name"] for a in status[1]["adapters"]] == ["other"]
            assert "install" in [e["event"] for e in source.events]

    try:
        asyncio.run(scenario())
    finally:
        registry.close()


def test_a_registry_made_before_adapters_gets_the_table_when_opened(tmp_path, bases, adapters):
    url = f"sqlite:///{tmp_path}/old.db"
    old = Registry(url, tmp_path / "artifacts", actor="test")
    old.register(bases[0], NAME)
    with old.engine.begin() as conn:
        conn.execute(text("DROP TABLE adapter_versions"))  # as a registry from before this table
    old.close()
    again = Registry(url, tmp_path / "artifacts", actor="test")
    try:
        assert push_adapter(again, adapters["thick"], NAME, 1).created
        assert again.verify().ok and again.get(NAME, 1).version == 1
    finally:
        again.close()
