"""The OpenAPI document against the running app: a schemathesis run with every check, bounded
examples, in-process over ASGI, on a tiny model with small limits (each example that passes
validation samples for real)."""

from __future__ import annotations

import time
from traceback import format_exc

import pytest
import schemathesis
from fastapi.openapi.utils import get_openapi
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.config import (
    ChecksConfig,
    GenerationConfig,
    NotAServerErrorConfig,
    PositiveDataAcceptanceConfig,
    ProjectConfig,
    SchemathesisConfig,
)
from schemathesis.generation import GenerationMode

from difforge.serving import ApiKey, Limits, ServiceConfig, create_app, hash_key
from tests.integration.serving_fixtures import make_service, make_tiny_model

EXAMPLES = 25  # per operation and mode: the whole run stays well under a minute
KEY = "contract-secret-5e6f"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _service_config() -> ServiceConfig:
    return ServiceConfig(
        audit_db=":memory:",
        limits=Limits(max_steps=4, max_n=2, max_batch_images=4),  # the model samples 4 steps
        api_keys=(ApiKey(id="ops", sha256=hash_key(KEY), scopes=("generate", "admin")),),
        torch_threads=1,
        warmup_steps=1,
        batch_wait_ms=0,
        queue_size=256,
        result_cache={"max_bytes": 1 << 20},  # repeated examples hit: X-Cache is checked too
    )


@pytest.fixture(scope="module", autouse=True)
def _stop_lifespans():
    yield
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # schemathesis keeps each app's lifespan open until then


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("contract") / "tiny")
    return create_app(make_service(model, _service_config()))


@pytest.fixture(scope="module")
def registry_app(tmp_path_factory):
    """A service that follows a registry (v1 production, v2 registered): the admin routes."""
    from difforge.registry import Registry
    from difforge.serving import open_service
    from difforge.serving.config import RegistryFollow

    root = tmp_path_factory.mktemp("contract-registry")
    reg = Registry(f"sqlite:///{root}/registry.db", actor="test")
    for i in (1, 2):
        folder = make_tiny_model(root / f"v{i}", seed=i, name="tiny")
        report = {"num_samples": 100, "metrics": {"fid": 10.0, "memorization": 0.0}}
        reg.register(folder, "tiny", reports=[report])
    reg.promote("tiny", 1, to="production")
    follow = RegistryFollow(poll_s=3600, check_s=3600, retry_failed_s=3600)
    config = _service_config().model_copy(update={"registry": follow})
    service, source = open_service(reg.config.url, "tiny", config)
    yield create_app(service, source)
    reg.close()


def test_openapi_describes_every_route_body_and_response(app):
    doc = app.openapi()
    inferred = get_openapi(title="t", version="0", routes=app.routes)["paths"]  # every route
    routes = {(p, m) for p, ops in inferred.items() for m in ops}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert len(routes) == 10 and routes == documented
    gen = doc["paths"]["/v1/generate"]["post"]
    body = gen["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["steps"]["anyOf"][0]["maximum"] == 4
    assert set(gen["responses"]["200"]["content"]) == {"image/png", "application/json"}
    assert {"415", "422", "429", "503", "504"} <= set(gen["responses"])
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def _config() -> SchemathesisConfig:
    # Rules across fields (seeds has n entries, png holds one image, ...) are not JSON Schema,
    # so a schema-valid body may still be a 422: allowed for positive examples, nothing else.
    # A 504 is the documented answer to a deadline_ms the client chose too short (1 ms); every
    # other 5xx is a failure.
    positive = PositiveDataAcceptanceConfig(
        expected_statuses=["2xx", "401", "403", "404", "409", "422", "429", "504"]
    )
    server = NotAServerErrorConfig(expected_statuses=["2xx", "3xx", "4xx", "504"])
    project = ProjectConfig(
        generation=GenerationConfig(max_examples=EXAMPLES),
        checks=ChecksConfig(positive_data_acceptance=positive, not_a_server_error=server),
    )
    cfg = SchemathesisConfig.discover()
    cfg.projects.default = project
    return cfg


def _fuzz(operation, mode: GenerationMode, statuses: dict) -> None:
    """EXAMPLES cases of one operation in one mode, each checked by every schemathesis check."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def check(case):
        response = case.call_and_validate(headers=AUTH)
        key = (operation.label, mode.value, response.status_code)
        statuses[key] = statuses.get(key, 0) + 1

    check()


def _run(app, only: str = "") -> dict:
    """Fuzz every operation whose path starts with `only`; returns {(op, mode, status): count}."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=_config())  # starts it
    deadline = time.monotonic() + 120
    while not app.state.service.ready:  # a 503 while warming up is not what is under test
        assert time.monotonic() < deadline, "the service did not warm up"
        time.sleep(0.05)
    failures, statuses = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(only):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, statuses)
            except Unsatisfiable:  # nothing to negate: a route without parameters or body
                assert mode == GenerationMode.NEGATIVE and not operation.body
            except Exception as e:  # collect every operation's failures, not only the first
                failures.append(f"{operation.label} ({mode.value}): {e}\n{format_exc(limit=-8)}")
    assert not failures, "\n\n".join(failures)
    return statuses


def test_schemathesis_finds_no_failure(app):
    statuses = _run(app)
    ok = {label for (label, mode, status) in statuses if mode == "positive" and status == 200}
    assert "POST /v1/generate" in ok and "GET /metrics" in ok  # it did reach the model
    assert sum(statuses.values()) >= 8 * EXAMPLES


def test_schemathesis_finds_no_failure_on_the_admin_routes(registry_app):
    statuses = _run(registry_app, only="/v1/admin")
    assert {label for label, _, _ in statuses} == {
        "POST /v1/admin/promote",
        "POST /v1/admin/rollback",
        "POST /v1/admin/canary",
        "GET /v1/admin/registry",
    }
