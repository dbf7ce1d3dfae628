"""POST /v1/anomaly/score: score series with the served anomaly detector (difforge.pipeline.anomaly).

A service started on a detector folder (`difforge serve --model DIR`, DIR holding anomaly.json and
model/) serves the detector's model for generation and scores series here. Body:
`{"series": [[x_0, ..., x_T-1], ...]}` (N, T) or (N, C, T), finite numbers, at most `limits.max_n
* 16` series; answer: `{"scores": [...], "flagged": [...], "threshold": t, "model_sha256": ...}`.
Scoring runs on the sampler thread like every other torch call.
"""

from __future__ import annotations

import json
import math
from typing import Any

from difforge.serving.protocol import RequestInvalid, field_error

MAX_SERIES_PER_N = 16  # series per request = limits.max_n * this


def parse_series(body: bytes, max_series: int) -> list:
    """The body's `series`, checked for shape and finiteness, or RequestInvalid (422)."""
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestInvalid([field_error((), "body is not JSON", "json_invalid")]) from None
    if not isinstance(data, dict) or set(data) != {"series"}:
        raise RequestInvalid([field_error((), 'the body is {"series": [...]}', "shape")])
    series = data["series"]
    if not isinstance(series, list) or not series:
        raise RequestInvalid([field_error("series", "must be a non-empty list", "shape")])
    if len(series) > max_series:
        msg = f"{len(series)} series; the limit is {max_series}"
        raise RequestInvalid([field_error("series", msg, "length")])
    for i, s in enumerate(series):
        if not _finite_nested(s):
            msg = "each series is a list of finite numbers (or of channels of them)"
            raise RequestInvalid([field_error(("series", i), msg, "value_error")])
    return series


def _finite_nested(s: Any, depth: int = 0) -> bool:
    if not isinstance(s, list) or not s or depth > 1:
        return False
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in s):
        return all(math.isfinite(v) for v in s)
    return all(_finite_nested(v, depth + 1) for v in s)


def score_series(detector, series: list) -> dict[str, Any]:
    """Scores of `series` (on the sampler thread); shape errors become RequestInvalid."""
    from difforge.core.errors import InvalidArgumentError

    try:
        scores = detector.scores(series).tolist()
    except (InvalidArgumentError, ValueError) as e:
        raise RequestInvalid([field_error("series", str(e), "shape")]) from None
    if not all(math.isfinite(s) for s in scores):
        msg = "values too large to score (the score overflowed)"
        raise RequestInvalid([field_error("series", msg, "value_error")])
    return {
        "scores": scores,
        "flagged": [s > detector.threshold for s in scores],
        "threshold": detector.threshold,
        "quantile": detector.quantile,
        "model_sha256": detector.model.sha256,
    }
