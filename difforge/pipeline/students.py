"""Students and their teachers: what a distilled model's provenance says it was distilled from.

difforge.training.distill writes, in a student's provenance, `teacher` (the shipped model the
chain of students started from: {"name", "sha256"}), `distilled_from` (its direct parent) and
`lineage` (every ancestor, parent first). The registry ties a student to its teacher's version
and the service serves it as the "fast" route beside that teacher; both read it through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difforge.core.errors import InvalidArgumentError


def teacher_sha256(provenance: Mapping[str, Any]) -> str | None:
    """The teacher's sha256 a provenance names, or None for a model that is no student."""
    teacher = provenance.get("teacher")
    if not isinstance(teacher, Mapping):
        return None
    sha = teacher.get("sha256")
    return sha if isinstance(sha, str) and sha else None


def ancestors(provenance: Mapping[str, Any]) -> list[str]:
    """Every model sha256 the student descends from: its lineage, then the teacher."""
    out = [p["sha256"] for p in provenance.get("lineage", []) if isinstance(p, Mapping)]
    root = teacher_sha256(provenance)
    return out + ([root] if root and root not in out else [])


def check_student_of(student: Any, teacher: Any) -> None:
    """InvalidArgumentError unless `student` (a Model) was distilled from `teacher` (a Model)."""
    prov = student.config.provenance
    if teacher_sha256(prov) is None:
        raise InvalidArgumentError(
            f"model {student.name!r} is not a distilled student: its provenance names no teacher"
        )
    if teacher.sha256 not in ancestors(prov):
        raise InvalidArgumentError(
            f"model {student.name!r} was distilled from {teacher_sha256(prov)[:12]}..., "
            f"not from {teacher.name!r} ({teacher.sha256[:12]}...)"
        )
