"""difforge.serving: a diffusion-aware HTTP service (FastAPI + uvicorn).

decode (protocol) -> batch (engine, batching) -> predict (one `sample()` call per batch) ->
unbatch (engine) -> encode (encode), with the router, access control, audit log and metrics
around it. `serve(model_path)` runs it; `create_app(service)` gives the ASGI app for tests.
"""

from difforge.common.png import png_text
from difforge.serving.app import build_service, create_app, serve
from difforge.serving.audit import AuditEntry, AuditLog, Verification
from difforge.serving.batching import BatchKey, BatchPlan, Row, sample_rows
from difforge.serving.breaker import Breaker, BreakerConfig
from difforge.serving.config import (
    ApiKey,
    Limits,
    RateLimit,
    ServiceConfig,
    hash_key,
    load_service_config,
)
from difforge.serving.encode import pixels_sha256
from difforge.serving.invariance import InvarianceReport, choose_plan, probe
from difforge.serving.protocol import GenerateRequest, Plan
from difforge.serving.registry_source import RegistrySource, open_service
from difforge.serving.router import ModelRouter, ModelVersion
from difforge.serving.service import Service

__all__ = [
    "ApiKey",
    "AuditEntry",
    "AuditLog",
    "BatchKey",
    "BatchPlan",
    "Breaker",
    "BreakerConfig",
    "GenerateRequest",
    "InvarianceReport",
    "Limits",
    "ModelRouter",
    "ModelVersion",
    "Plan",
    "RateLimit",
    "RegistrySource",
    "Row",
    "Service",
    "ServiceConfig",
    "Verification",
    "build_service",
    "choose_plan",
    "create_app",
    "hash_key",
    "load_service_config",
    "open_service",
    "pixels_sha256",
    "png_text",
    "probe",
    "sample_rows",
    "serve",
]
