"""The OpenAPI document against an app with output filters on: the review queue's routes and
the 202 / 410 answers, under the same schemathesis run as tests/contract/test_http_contract.py."""

from __future__ import annotations

import pytest
from fastapi.openapi.utils import get_openapi

from difforge.serving import ServiceConfig, create_app
from tests.contract.test_http_contract import _run, _service_config, _stop_lifespans  # noqa: F401
from tests.integration.serving_fixtures import make_service, make_tiny_model

# label 7 is held for review, 9 refused: the fuzzed bodies reach every outcome
RULES = [
    {"kind": "conditioning", "key": "labels", "equals": [7]},
    {"kind": "conditioning", "key": "labels", "equals": [9], "action": "refuse"},
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("contract-review") / "tiny")
    filters = {"stage": [{"name": "policy", "options": {"rules": RULES}}]}
    config = ServiceConfig.model_validate({**_service_config().model_dump(), "filters": filters})
    return create_app(make_service(model, config))


def test_openapi_describes_the_review_routes(app):
    doc = app.openapi()
    inferred = get_openapi(title="t", version="0", routes=app.routes)["paths"]
    routes = {(p, m) for p, ops in inferred.items() for m in ops}
    assert routes == {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert len(routes) == 14  # the 10 of test_http_contract + 4 review routes


@pytest.mark.slow  # about a minute on a shared 2-core CPU
def test_schemathesis_finds_no_failure_with_filters_on(app):
    statuses = _run(app, only="/v1/")
    labels = {label for label, _, _ in statuses}
    assert {
        "GET /v1/admin/review",
        "GET /v1/admin/review/{request_id}",
        "POST /v1/admin/review/{request_id}/approve",
        "POST /v1/admin/review/{request_id}/reject",
    } <= labels
    codes = {code for (label, _, code) in statuses if label == "POST /v1/generate"}
    assert 200 in codes
