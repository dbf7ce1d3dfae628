"""The "fast" route: a distilled student served beside its teacher, chosen per request."""

from __future__ import annotations

import numpy as np
import pytest

import difforge
from difforge.common.png import png_pixels
from difforge.core.errors import InvalidArgumentError
from difforge.serving import ServiceConfig, png_text
from difforge.serving.router import ModelRouter, ModelVersion, check_fast
from difforge.serving.service import Service
from tests.distill_fixtures import make_student, make_teacher
from tests.integration.serving_fixtures import run, running

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = ServiceConfig(audit_db=":memory:", torch_threads=1, warmup_steps=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    teacher = make_teacher(root / "teacher")
    return teacher, make_student(teacher, root / "student")


def test_fast_route_answers_with_the_students_bytes(pair):
    teacher_dir, student_dir = pair
    teacher = difforge.load(teacher_dir)
    student = difforge.load(student_dir)
    want = student.sample(labels=[3], seed=7).images[0, 0].numpy()  # its own defaults
    plain = teacher.sample(labels=[3], seed=7).images[0, 0].numpy()

    async def scenario():
        svc = Service(CONFIG, ModelRouter(ModelVersion(teacher), ModelVersion(student)))
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": [3], "seed": 7, "route": "fast"})
            assert r.status_code == 200, r.text
            text = png_text(r.content)
            assert text["model_sha256"] == student.sha256
            assert (text["sampler"], text["steps"]) == ("euler", "2")
            assert np.array_equal(png_pixels(r.content), want)
            r = await c.post("/v1/generate", json={"labels": [3], "seed": 7})
            assert png_text(r.content)["model_sha256"] == teacher.sha256
            assert np.array_equal(png_pixels(r.content), plain)
            models = (await c.get("/v1/models")).json()
            assert any(m.get("role") == "fast" for m in models["models"])

    run(scenario())
    assert not np.array_equal(want, plain)


def test_fast_route_without_a_student_is_a_422(pair):
    teacher = difforge.load(pair[0])

    async def scenario():
        async with running(Service(CONFIG, ModelRouter(ModelVersion(teacher)))) as c:
            r = await c.post("/v1/generate", json={"labels": [3], "seed": 7, "route": "fast"})
            assert r.status_code == 422
            assert r.json()["detail"][0]["loc"] == ["body", "route"]
            r = await c.post("/v1/generate", json={"labels": [3], "seed": 7, "route": "slow"})
            assert r.status_code == 422

    run(scenario())


def test_a_model_that_is_not_its_student_is_refused(pair, tmp_path):
    teacher_dir, student_dir = pair
    other = difforge.load(make_teacher(tmp_path / "other", seed=1))
    student, teacher = difforge.load(student_dir), difforge.load(teacher_dir)
    with pytest.raises(InvalidArgumentError, match="distilled from"):
        check_fast(other, student)
    with pytest.raises(InvalidArgumentError, match="not a distilled student"):
        check_fast(other, teacher)
    with pytest.raises(InvalidArgumentError, match="distilled from"):  # where it is installed
        ModelRouter(ModelVersion(other), ModelVersion(student))
    router = ModelRouter(ModelVersion(teacher), ModelVersion(student))
    ready = ModelVersion(other, plan=router.production.plan or object())  # a "warm" stand-in
    router.swap(ready)
    assert router.fast is None  # no student of the new production: it leaves with the old one
