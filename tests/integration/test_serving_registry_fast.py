"""`difforge serve --registry`: production's newest registered student is the fast version, picked
up on sync (a student registered while serving) and dropped when production moves to a version it
is no student of. SQLite always; PostgreSQL when DIFFORGE_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import pytest

from difforge.registry import Registry
from difforge.registry.students import register_student
from difforge.serving import ServiceConfig, png_text
from difforge.serving.breaker import BreakerConfig
from difforge.serving.config import RegistryFollow
from difforge.serving.registry_source import open_service, registry_version
from tests.distill_fixtures import make_student, make_teacher
from tests.integration.serving_fixtures import run, running, until
from tests.integration.test_registry import registry_url  # noqa: F401  (sqlite + postgresql)

pytestmark = pytest.mark.usefixtures("one_thread")

NAME, NO_SMOKE = "tiny", {"smoke_sample": False}
QUICK = RegistryFollow(poll_s=0.05, check_s=3600, retry_failed_s=3600)
BREAKER = BreakerConfig(latency_slo_s=1e-6, min_samples=2, cooldown_s=3600, degraded_steps=2)
BODY = {"labels": [3], "seed": 11, "steps": 4}
REPORT = {
    "num_samples": 1000,
    "metrics": {"fid": 10.0, "label_accuracy": 0.99, "memorization_rate": 0.0},
    "extractor": {"name": "mnist-lenet", "sha256": "e" * 64},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(teacher, its student, another teacher with no student)."""
    root = tmp_path_factory.mktemp("registry-fast")
    teacher = make_teacher(root / "teacher")
    return teacher, make_student(teacher, root / "student"), make_teacher(root / "other", seed=1)


def test_serve_registry_follows_productions_newest_student(registry_url, folders, tmp_path):  # noqa: F811
    teacher, student, other = folders
    artifacts = tmp_path / "artifacts"
    reg = Registry(registry_url, artifacts, actor="test")
    config = ServiceConfig(
        audit_db=":memory:", torch_threads=1, warmup_steps=1, batch_wait_ms=0,
        registry=QUICK, breaker=BREAKER,
    )  # fmt: skip
    try:
        reg.register(teacher, NAME, reports=[REPORT])
        reg.promote(NAME, 1, gates=NO_SMOKE)

        async def scenario():
            service, source = open_service(registry_url, NAME, config, str(artifacts))
            router = service.router
            async with running(service, source=source, timeout=60) as c:
                assert router.fast is None  # no student registered yet
                r = await c.post("/v1/generate", json={**BODY, "route": "fast"})
                assert r.status_code == 422

                register_student(reg, student, "tiny-fast")  # while serving: the poll finds it
                await until(lambda: router.fast is not None)
                fast = router.fast
                assert (fast.meta["registry_name"], registry_version(fast)) == ("tiny-fast", 1)
                r = await c.post("/v1/generate", json={**BODY, "route": "fast"})
                assert r.status_code == 200, r.text
                assert r.headers["x-model-version"] == fast.id
                assert png_text(r.content)["model_sha256"] == fast.model.sha256
                # the breaker's cheap route is the same version
                for seed in (1, 2):
                    await c.post("/v1/generate", json={**BODY, "seed": seed})
                r = await c.post("/v1/generate", json={**BODY, "allow_degraded": True})
                assert r.headers["x-difforge-degraded"].endswith(f"model={fast.id}")
                models = (await c.get("/v1/models")).json()["models"]
                assert [m["role"] for m in models] == ["production", "fast"]
                serving = source.status()["serving"]
                assert serving[1]["role"] == "fast"
                assert serving[1]["registry_name"] == "tiny-fast"

                reg.register(other, NAME, reports=[REPORT])  # v2: not the student's teacher
                reg.promote(NAME, 2, gates=NO_SMOKE)
                await until(lambda: registry_version(router.production) == 2)
                assert router.fast is None  # it left with its teacher
                r = await c.post("/v1/generate", json={**BODY, "route": "fast"})
                assert r.status_code == 422
                reg.promote(NAME, 1, gates=NO_SMOKE)  # back to the teacher: its student returns
                await until(lambda: router.fast is not None)
                assert router.fast.meta["registry_name"] == "tiny-fast"

            service, source = open_service(registry_url, NAME, config, str(artifacts))
            async with running(service, source=source, timeout=60) as c:  # a fresh start
                assert service.router.fast is not None and service.router.fast.ready
                r = await c.post("/v1/generate", json={**BODY, "route": "fast"})
                assert r.headers["x-model-version"] == service.router.fast.id

        run(scenario())
    finally:
        reg.close()


def test_serve_registry_refuses_a_fast_folder(tmp_path):
    from typer.testing import CliRunner

    from difforge.cli import app

    url = f"sqlite:///{tmp_path}/registry.db"
    args = ["serve", "--registry", url, "--name", NAME, "--fast", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "register students" in result.output  # the registry's newest student is the fast one
