"""Reading a version's stored evaluation reports whole (the gates read only their summaries):
what the serving drift monitor compares a served version with (difforge.serving.drift).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from difforge.registry.schema import evaluation_reports, model_versions


def latest_report(registry, name: str, version: int) -> dict[str, Any] | None:
    """The evaluation report attached last to version `version` of model `name`, parsed from the
    stored text (NaN kept, as stored); None when the version has none or does not exist.

    Args:
        registry: a difforge.registry.Registry.
        name, version: the registered model and its version number.
    """
    q = (
        select(evaluation_reports.c.report)
        .join(model_versions, model_versions.c.id == evaluation_reports.c.version_id)
        .where(model_versions.c.name == name, model_versions.c.version == version)
        .order_by(evaluation_reports.c.id.desc())
        .limit(1)
    )
    with registry.engine.connect() as conn:
        text = conn.scalar(q)
    return None if text is None else json.loads(text)
