"""Students in the registry: tied to the registered version of their teacher."""

from __future__ import annotations

import pytest

from difforge.core.errors import InvalidArgumentError
from difforge.registry import NotFoundError, Registry
from difforge.registry.students import (
    fast_student,
    register_student,
    students_of,
    teacher_of,
)
from tests.distill_fixtures import make_student, make_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

REPORT = {
    "num_samples": 1000,
    "metrics": {"fid": 10.0, "label_accuracy": 0.99, "memorization_rate": 0.0},
    "extractor": {"name": "mnist-lenet", "sha256": "e" * 64},
}


def test_a_student_is_registered_tied_to_its_teacher(tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    student = make_student(teacher, tmp_path / "student")
    reg = Registry(f"sqlite:///{tmp_path}/registry.db")
    try:
        with pytest.raises(NotFoundError, match="register the teacher first"):
            register_student(reg, student, "tiny-fast")
        assert reg.list_models() == []  # refused before anything was stored
        with pytest.raises(InvalidArgumentError, match="not a distilled student"):
            register_student(reg, teacher, "tiny")
        t = reg.register(teacher, "tiny").info
        assert fast_student(reg, "tiny") is None  # no production yet
        r, linked = register_student(reg, student, "tiny-fast")
        assert linked.ref == t.ref and r.created
        assert teacher_of(reg, r.info).ref == "tiny:v1"
        assert [s.ref for s in students_of(reg, t)] == ["tiny-fast:v1"]
        entry = reg.audit_log("tiny-fast")[-1]
        assert entry.action == "link_teacher" and entry.details["teacher"] == "tiny:v1"
        reg.attach_report("tiny", 1, REPORT)
        reg.promote("tiny", 1, gates={"smoke_sample": False})
        assert fast_student(reg, "tiny").ref == "tiny-fast:v1"
        assert reg.verify().ok
    finally:
        reg.close()
