"""Distilled students in the registry, each tied to the registered version of its teacher.

A student is a model folder whose provenance names its teacher's sha256 (difforge.training.distill
writes it; difforge.pipeline.students reads it). `register_student` refuses a student whose teacher
is not a registered version, registers it and records the link in the audit chain; `students_of`
and `fast_student` find the students of a version (what `difforge serve --registry` serves as
the "fast" route beside production).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from difforge.core.errors import InvalidArgumentError
from difforge.pipeline import load
from difforge.pipeline.students import teacher_sha256
from difforge.registry.errors import NotFoundError
from difforge.registry.registry import Registry
from difforge.registry.schema import write_transaction
from difforge.registry.types import Registration, VersionInfo


def find_version(registry: Registry, sha256: str) -> VersionInfo | None:
    """The registered version whose weights (or pipeline.json) have this sha256, if any."""
    for name in registry.list_models():
        for info in registry.list_versions(name):
            if info.weights_sha256 == sha256:
                return info
    return None


def register_student(
    registry: Registry,
    path: str | Path,
    name: str | None = None,
    *,
    reports: Sequence[str | Path | Mapping[str, Any]] = (),
) -> tuple[Registration, VersionInfo]:
    """Register the student folder at `path`, tied to its teacher's registered version.

    Returns:
        (the student's Registration, the teacher's VersionInfo).

    Raises:
        InvalidArgumentError: the folder's provenance names no teacher.
        NotFoundError: its teacher is not registered (register the teacher first).
    """
    model = load(path)
    sha = teacher_sha256(model.config.provenance)
    if sha is None:
        raise InvalidArgumentError(f"{path} is not a distilled student: no teacher in provenance")
    teacher = find_version(registry, sha)
    if teacher is None:
        raise NotFoundError(
            f"the teacher of {model.name!r} (sha256 {sha[:12]}...) is not a registered version; "
            "register the teacher first"
        )
    reg = registry.register(path, name, reports=reports)
    if reg.created:
        with write_transaction(registry.engine) as conn:
            registry._audit(  # one chain for every registry event
                conn, "link_teacher", reg.info.name, reg.info.version,
                teacher=teacher.ref, teacher_sha256=sha,
            )  # fmt: skip
    return reg, teacher


def teacher_of(registry: Registry, info: VersionInfo) -> VersionInfo | None:
    """The registered teacher version of a student version (None for a non-student)."""
    sha = teacher_sha256(info.config.get("provenance", {}))
    return None if sha is None else find_version(registry, sha)


def students_of(registry: Registry, teacher: VersionInfo) -> list[VersionInfo]:
    """Every registered version whose provenance names `teacher` as its teacher, oldest first."""
    return [
        info
        for name in registry.list_models()
        for info in registry.list_versions(name)
        if teacher_sha256(info.config.get("provenance", {})) == teacher.weights_sha256
    ]


def fast_student(registry: Registry, name: str) -> VersionInfo | None:
    """The newest student of `name`'s production version (None: no production or no student)."""
    prod = registry.resolve(name).production
    found = [] if prod is None else students_of(registry, prod)
    return max(found, key=lambda i: i.created_at) if found else None
