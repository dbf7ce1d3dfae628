"""The FastAPI app: thin routes over `Service`, and `serve()` for `difforge serve`.

Routes validate, hand to the service, encode; errors become JSON with a field-level `detail`.

    POST /v1/generate        images (PNG for one, JSON with base64 PNGs for several)
    POST /v1/upscale         super-resolution of a base64 PNG `image` (an upsampler model)
    GET  /v1/models          served versions, defaults and limits
    GET  /v1/requests/{id}   progress of a running request, or its audit record; for an output
                             held for review 202 while pending, its images once approved, 410
                             after a rejection (difforge.serving.review)
    GET  /v1/audit/verify    check the audit log's hash chain (admin)
    GET  /v2/health/live     the process is up
    GET  /v2/health/ready    the production model is loaded and warmed up
    GET  /metrics            Prometheus (admin key or loopback)
    GET  /v1/drift           the drift monitor's windows and latest distances (admin)
    GET  /                   a small web page to try the model

Served from a registry (`serve(registry=URL, name=NAME)`), admin key or loopback:

    POST /v1/admin/promote   {version, to, gates?, percent?}  gated promotion, then traffic moves
    POST /v1/admin/rollback  {alias?, reason?}                the alias's previous version
    POST /v1/admin/canary    {version?, percent, gates?}      a new canary, or its share
    GET  /v1/admin/registry  what is served, what failed to load, recent events

With output filters configured, the review queue (difforge.serving.review_routes):

    GET  /v1/admin/review, GET /v1/admin/review/{id}, POST /v1/admin/review/{id}/approve|reject
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from difforge.core.errors import InvalidArgumentError
from difforge.core.sigmas import GRID_KINDS
from difforge.serving.access import (
    AccessDenied,
    Principal,
    ProxyTrust,
    is_loopback,
    retry_after_header,
)
from difforge.serving.admin import CanaryBody, PromoteBody, RollbackBody, parse_admin
from difforge.serving.anomaly import MAX_SERIES_PER_N, parse_series, score_series
from difforge.serving.config import ServiceConfig, load_service_config
from difforge.serving.engine import on_passing_thread
from difforge.serving.idempotency import StoredResponse
from difforge.serving.openapi import openapi_document
from difforge.serving.protocol import RequestInvalid, field_error, validation_body
from difforge.serving.registry_source import RegistrySource, open_service
from difforge.serving.router import ModelRouter, ModelVersion
from difforge.serving.service import GenerateCall, Service, ServiceError

log = logging.getLogger("difforge.serving")

# The one place outcomes become HTTP statuses: the service raises ServiceError(reason), the routes
# answer HTTP_STATUS[reason], and the audit log records the same number.
HTTP_STATUS: dict[str, int] = {
    "ok": 200,
    "validation": 422,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "idempotency_conflict": 409,
    "idempotency_mismatch": 422,
    "rate_limited": 429,
    "disconnect": 499,  # nginx's "client closed request": nobody reads it, metrics do
    "internal": 500,
    "non_finite": 500,
    "queue_full": 503,
    "not_ready": 503,
    "shutdown": 503,
    "deadline": 504,
    "gate_failed": 409,
    "integrity_failure": 409,
    "registry_conflict": 409,
    "registry_unavailable": 503,
    # the output filter stage and its review queue (difforge.serving.review)
    "held": 202,
    "output_refused": 403,
    "review_full": 503,
    "review_conflict": 409,
    "review_rejected": 410,
    "review_expired": 410,
}
MAX_IDEMPOTENCY_KEY = 128  # characters of an Idempotency-Key header
MAX_HEADER_BYTES = 8192  # all request headers together; more is a 431


# answered for any client, keys or not: a remote health checker must be able to probe
_PUBLIC = frozenset({"/v2/health/live", "/v2/health/ready"})


class _Edge:
    """Pure ASGI middleware: who the client is (trusted proxies), loopback-only enforcement and
    the request-duration histogram."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.proxies = ProxyTrust(service.config.trusted_proxies)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            self.service.metrics.error("validation")
            msg = f"request headers exceed {MAX_HEADER_BYTES} bytes"
            return await JSONResponse({"detail": msg}, 431)(scope, receive, send)
        peer, port = scope.get("client") or (None, 0)
        forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
        host = self.proxies.client(peer, forwarded)
        if host != peer:  # what every route sees as request.client
            scope = {**scope, "client": (host, port)}
        public = scope["path"] in _PUBLIC
        if self.service.access.loopback_only and not is_loopback(host) and not public:
            self.service.metrics.error("forbidden")
            resp = JSONResponse({"detail": "this service answers loopback clients only"}, 403)
            return await resp(scope, receive, send)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.service.metrics.request_seconds.labels(
                route, scope["method"], str(status[0])
            ).observe(time.perf_counter() - start)


def require_json(request: Request) -> None:
    """415 unless the body is declared `application/json` (text/plain, forms and multipart are
    refused rather than guessed at)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        shown = media or "none"
        msg = f"Content-Type must be application/json, got {shown}"
        raise ServiceError("unsupported_media_type", msg)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) past `limit` bytes without reading the rest; a client that leaves
    while sending it is a disconnect (499 in the metrics), not a server error."""
    declared = request.headers.get("content-length")
    too_big = RequestInvalid(
        [field_error((), f"body exceeds {limit} bytes", "body_too_large")], "body_too_large"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        msg = "the client disconnected while sending the body"
        raise ServiceError("disconnect", msg) from None
    return b"".join(chunks)


def _header(request: Request, name: str, limit: int) -> str | None:
    """A header of at most `limit` visible ASCII characters (422 otherwise), or None."""
    value = request.headers.get(name)
    if value is not None and not (
        0 < len(value) <= limit and value.isascii() and value.isprintable()
    ):
        msg = f"1-{limit} printable ASCII characters"
        raise ServiceError(
            "validation", [{"loc": ["header", name], "msg": msg, "type": "value_error"}]
        )
    return value


def _stored(resp: StoredResponse) -> Response:
    return Response(resp.body, resp.status, headers=resp.headers, media_type=resp.media_type)


def create_app(service: Service, source: RegistrySource | None = None) -> FastAPI:
    """The ASGI app over `service`; its lifespan starts and stops the service.

    Args:
        service: the service.
        source: the registry the service follows (adds the /v1/admin routes); None: a fixed model.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            if source is not None:
                await source.start()
            yield
        finally:
            if source is not None:
                await source.stop()
            await service.stop()

    app = FastAPI(title="difforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    service.status_of = HTTP_STATUS.__getitem__  # what the audit log records
    app.state.source = source
    app.add_middleware(_Edge, service=service)
    _add_error_handlers(app, service)
    app.include_router(_api_routes(service))
    app.include_router(_ops_routes(service))
    if source is not None:
        app.include_router(_admin_routes(service, source))
    if service.screen.enabled:  # output filters configured: the review queue's admin routes
        from difforge.serving.review_routes import review_router

        app.include_router(review_router(service))

    def contract() -> dict:  # the routes read raw bodies: the contract is written out
        if app.openapi_schema is None:
            model = service.router.production.model
            app.openapi_schema = openapi_document(
                service.config,
                model,
                admin=source is not None,
                version=app.version,
                review=service.screen.enabled,
            )
        return app.openapi_schema

    app.openapi = contract
    return app


def _principal(service: Service, request: Request, scope: str) -> Principal:
    host = request.client.host if request.client else None
    return service.access.authorize(request.headers, host, scope)


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(ServiceError)
    async def _failure(request: Request, exc: ServiceError):
        service.metrics.error(exc.reason, exc.role)
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = retry_after_header(exc.retry_after)
        if exc.request_id is not None:
            headers["X-Request-Id"] = exc.request_id
        return JSONResponse({"detail": exc.detail}, HTTP_STATUS[exc.reason], headers=headers)

    @app.exception_handler(AccessDenied)
    async def _denied(request: Request, exc: AccessDenied):
        service.metrics.error(exc.reason)
        headers = {"WWW-Authenticate": "Bearer"} if exc.reason == "unauthorized" else None
        return JSONResponse({"detail": exc.public_detail}, HTTP_STATUS[exc.reason], headers=headers)

    @app.exception_handler(RequestInvalid)
    async def _invalid(request: Request, exc: RequestInvalid):
        service.metrics.error(exc.reason)
        return JSONResponse(validation_body(exc.errors), HTTP_STATUS[exc.reason])


def _api_routes(service: Service) -> APIRouter:
    """What clients call: generate, models, request status."""
    api = APIRouter()

    @api.post("/v1/generate")
    async def generate(request: Request) -> Response:
        who = _principal(service, request, "generate")
        require_json(request)
        idempotency_key = _header(request, "idempotency-key", MAX_IDEMPOTENCY_KEY)
        body = await read_body(request, service.config.limits.max_body_bytes)
        call = GenerateCall(
            who,
            body,
            request_id=request.headers.get("x-request-id"),
            idempotency_key=idempotency_key,
            receive=request.receive,
        )
        return _stored(await service.generate(call))

    @api.post("/v1/upscale")
    async def upscale(request: Request) -> Response:
        from difforge.serving.upscale import generate_body

        who = _principal(service, request, "generate")
        require_json(request)
        body = await read_body(request, service.config.limits.max_body_bytes)
        call = GenerateCall(
            who,
            generate_body(body, service.router.production.model),
            request_id=request.headers.get("x-request-id"),
            idempotency_key=_header(request, "idempotency-key", MAX_IDEMPOTENCY_KEY),
            receive=request.receive,
        )
        return _stored(await service.generate(call))

    @api.post("/v1/anomaly/score")
    async def anomaly_score(request: Request) -> dict:
        _principal(service, request, "generate")
        require_json(request)
        detector = service.detector
        if detector is None:
            raise ServiceError("not_found", "this service has no anomaly detector")
        body = await read_body(request, service.config.limits.max_body_bytes)
        series = parse_series(body, service.config.limits.max_n * MAX_SERIES_PER_N)
        return await service.engine.call(score_series, detector, series)

    @api.get("/v1/models")
    async def models(request: Request) -> dict:
        _principal(service, request, "generate")
        router = service.router
        return {
            "models": [{"role": role, **v.describe()} for role, v in router.versions()],
            "canary_share": router.canary_share,
            "breaker": service.fallback.status(),
            "limits": service.config.limits.model_dump(mode="json"),
            "grids": list(GRID_KINDS),
            **service.screen.models_info(),
        }

    @api.get("/v1/requests/{request_id}")
    async def request_status(request_id: str, request: Request) -> Response:
        status = service.request_status(request_id, _principal(service, request, "any"))
        if status is None:
            raise ServiceError("not_found", "no such request")
        if isinstance(status, StoredResponse):  # held for review: 202, then the approved images
            return _stored(status)
        return JSONResponse(status)

    return api


def _ops_routes(service: Service) -> APIRouter:
    """What operators call: health, metrics, audit verification, and the web page."""
    ops = APIRouter()
    page = resources.files("difforge.serving").joinpath("static/index.html").read_text()

    @ops.get("/v1/audit/verify")
    async def audit_verify(request: Request) -> dict:
        _principal(service, request, "admin")
        v = await asyncio.to_thread(service.audit.verify)  # reads every row: off the loop
        return {**dataclasses.asdict(v), "head": service.audit.head()}

    @ops.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @ops.get("/v2/health/ready")
    async def ready() -> Response:
        ok = service.ready
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @ops.get("/metrics")
    async def metrics(request: Request) -> Response:
        _principal(service, request, "admin")
        return Response(service.metrics.exposition(), media_type=service.metrics.content_type)

    @ops.get("/v1/drift")
    async def drift(request: Request) -> dict:
        _principal(service, request, "admin")
        if service.drift is None:
            raise ServiceError(
                "not_found", "the drift monitor is off (drift.enabled in the config)"
            )
        return service.drift.status()

    @ops.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return ops


def _admin_routes(service: Service, source: RegistrySource) -> APIRouter:
    """What operators call to move traffic between registry versions."""
    admin = APIRouter()
    limit = service.config.limits.max_body_bytes

    @admin.post("/v1/admin/promote")
    async def promote(request: Request) -> dict:
        who = _principal(service, request, "admin")
        require_json(request)
        body = parse_admin(PromoteBody, await read_body(request, limit))
        return await source.promote(body, who)

    @admin.post("/v1/admin/rollback")
    async def rollback(request: Request) -> dict:
        who = _principal(service, request, "admin")
        require_json(request)
        body = parse_admin(RollbackBody, await read_body(request, limit))
        return await source.rollback(body, who)

    @admin.post("/v1/admin/canary")
    async def canary(request: Request) -> dict:
        who = _principal(service, request, "admin")
        require_json(request)
        body = parse_admin(CanaryBody, await read_body(request, limit))
        return await source.set_canary(body, who)

    @admin.get("/v1/admin/registry")
    async def registry_status(request: Request) -> dict:
        _principal(service, request, "admin")
        return source.status()

    return admin


def build_service(
    model_path: str | Path,
    config: ServiceConfig,
    adapters: Sequence[tuple[str, str, float]] = (),
    fast: str | Path | None = None,
) -> Service:
    """Load the model at `model_path` as the production version of a new Service, with LoRA
    `adapters` (name, folder, scale) attached beside it (requests name them) and optionally a
    distilled student of it at `fast` as the fast version (`route: "fast"` requests and the
    breaker's cheap route; refused unless it descends from the model, router.check_fast).

    The load runs on a passing thread: torch work stays off the main thread (see
    `difforge.serving.engine.on_passing_thread`)."""
    from difforge.pipeline import load
    from difforge.pipeline.adapters import attach_adapter, load_adapter
    from difforge.pipeline.anomaly import DETECTOR_FILE, load_detector

    if (Path(model_path) / DETECTOR_FILE).is_file():  # a detector folder: its model + scoring
        detector = on_passing_thread(load_detector, model_path)
        service = Service(config, ModelRouter(ModelVersion(detector.model)))
        service.detector = detector
        return service

    def load_all():
        model = load(model_path)
        for name, folder, scale in adapters:
            attach_adapter(model, load_adapter(folder), name=name, scale=scale)
        return model

    prod = ModelVersion(on_passing_thread(load_all))
    student = None if fast is None else ModelVersion(on_passing_thread(load, fast))
    return Service(config, ModelRouter(prod, student))


def serve(
    model_path: str | Path | None = None,
    *,
    registry: str | None = None,
    name: str | None = None,
    artifacts: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config_path: str | Path | None = None,
    adapters: Sequence[tuple[str, str, float]] = (),
    fast: str | Path | None = None,
) -> None:
    """Run the HTTP service until interrupted (`difforge serve`).

    Args:
        model_path: a model folder to serve as production; or
        registry, name: a registry URL and model name: serve its production and canary versions
            and follow the registry (admin routes, polling, automatic canary rollback).
        artifacts: the registry's artifact directory (default: beside a SQLite registry).
        host, port: where to listen.
        config_path: the service config JSON (default: all defaults).
        adapters: LoRA adapters (name, folder, scale) served beside a --model (not --registry).
        fast: a distilled student of the --model folder, the fast version: it answers
            `route: "fast"` requests and is the circuit breaker's cheap route. With --registry
            the production version's newest registered student is (registry_source).
    """
    import uvicorn

    check_model_source(model_path, registry, name, artifacts)
    config = load_service_config(config_path)
    source = None
    if registry is not None:
        if adapters or fast:
            raise InvalidArgumentError(
                "--adapter and --fast serve beside --model; with --registry, push adapters to the "
                "registry (difforge registry push-adapter) and register students (difforge "
                "registry register-student): production's newest student is the fast version"
            )
        service, source = open_service(registry, name or "", config, artifacts)
    else:
        service = build_service(model_path or "", config, adapters, fast)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    prod = service.router.production
    origin = (
        "" if source is None else f" from registry model {name} v{prod.meta['registry_version']}"
    )
    log.info("serving %s (version %s%s) on http://%s:%d", prod.name, prod.id, origin, host, port)
    if config.loopback_only:
        log.warning(
            "no API keys configured: answering loopback clients only (127.0.0.0/8, ::1); "
            "add api_keys to the config to serve other hosts"
        )
    else:
        log.info("%d API key(s) configured", len(config.api_keys))
    # proxy_headers off: uvicorn would otherwise take the client from X-Forwarded-For for any
    # peer in FORWARDED_ALLOW_IPS (an environment variable); config.trusted_proxies decides that
    app = create_app(service, source)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)


def check_model_source(
    model_path: str | Path | None,
    registry: str | None,
    name: str | None,
    artifacts: str | Path | None = None,
) -> None:
    """Exactly one of a model folder or a registry and model name, else InvalidArgumentError."""
    from difforge.core.errors import InvalidArgumentError

    if (model_path is None) == (registry is None):
        which = "both" if model_path is not None else "neither"
        raise InvalidArgumentError(
            "serve a model folder (--model PATH) or a registry model "
            f"(--registry URL --name NAME), not {which}"
        )
    if registry is not None and not name:
        raise InvalidArgumentError("--registry needs --name, the registered model to serve")
    if registry is None and (name is not None or artifacts is not None):
        raise InvalidArgumentError("--name and --artifacts apply with --registry only")
