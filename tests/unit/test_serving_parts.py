"""Unit tests of the serving parts that need no HTTP: config, validation, access, rate limits,
idempotency, the audit chain, routing and the batch-invariance probe."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from difforge.core.errors import InvalidArgumentError
from difforge.pipeline import ConditioningSpec, Model, SamplingDefaults
from difforge.serving.access import AccessControl, AccessDenied, RateLimiter, is_loopback
from difforge.serving.audit import AuditEntry, AuditLog
from difforge.serving.batching import BatchKey, BatchPlan
from difforge.serving.config import (
    ApiKey,
    Limits,
    RateLimit,
    ServiceConfig,
    hash_key,
    load_service_config,
)
from difforge.serving.idempotency import IdempotencyConflict, IdempotencyStore, StoredResponse
from difforge.serving.invariance import choose_plan, probe, probe_positions
from difforge.serving.protocol import (
    GenerateRequest,
    RequestInvalid,
    parse_body,
    resolve,
)
from difforge.serving.router import ModelRouter, ModelVersion, routing_fraction
from tests.helpers import tamper_sqlite


def fake_model(classes: int, guidance: float = 3.0) -> SimpleNamespace:
    """What the resolver reads of a model: its conditioning spec and sampling defaults."""
    sampling = SamplingDefaults(sampler="dpmpp_2m", steps=20, guidance=guidance)
    spec = ConditioningSpec.for_classes(classes)
    return SimpleNamespace(spec=spec, sampling=sampling, image_shape=(1, 8, 8))


FACTS = fake_model(10)
LIMITS = Limits(max_steps=50, max_n=8, max_guidance=10.0, allowed_samplers=("dpmpp_2m", "ddim"))


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# -- config ---------------------------------------------------------------------------------------


def test_config_loads_json_and_names_every_bad_field(tmp_path):
    good = tmp_path / "serve.json"
    good.write_text(
        json.dumps(
            {
                "limits": {"max_steps": 30},
                "queue_size": 4,
                "api_keys": [{"id": "a", "sha256": hash_key("secret"), "scopes": ["admin"]}],
            }
        )
    )
    cfg = load_service_config(good)
    assert cfg.limits.max_steps == 30 and cfg.queue_size == 4 and not cfg.loopback_only
    with pytest.raises(ValidationError):  # frozen
        cfg.queue_size = 5  # type: ignore[misc]
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"queue_size": 0, "limits": {"allowed_samplers": ["nope"]}, "colour": 1})
    )
    with pytest.raises(InvalidArgumentError) as e:
        load_service_config(bad)
    msg = str(e.value)
    assert "queue_size" in msg and "allowed_samplers" in msg and "colour" in msg
    assert "ddim" in msg  # the unknown sampler's message lists the allowed ones


def test_config_refuses_duplicate_key_ids_and_plain_keys():
    key = {"id": "a", "sha256": hash_key("k")}
    with pytest.raises(ValueError, match="duplicate"):
        ServiceConfig(api_keys=[key, key])
    with pytest.raises(ValueError):
        ApiKey(id="a", sha256="not-a-hash")


# -- validation -------------------------------------------------------------------------------------


def test_resolve_fills_defaults_and_broadcasts_one_label():
    plan = resolve(GenerateRequest(labels=[3], n=3, seed=10), LIMITS, FACTS)
    assert plan.conditioning == {"labels": [3, 3, 3]} and plan.seeds == (10, 11, 12)
    assert (plan.sampler, plan.steps, plan.guidance) == ("dpmpp_2m", 20, 3.0)
    assert plan.response_format == "json"
    one = resolve(GenerateRequest(labels=[1], seed=5), LIMITS, FACTS)
    assert one.n == 1 and one.response_format == "png"
    cycled = resolve(GenerateRequest(n=3, seed=0), LIMITS, FACTS)  # the library's default
    assert cycled.conditioning == {"labels": [0, 1, 2]} and cycled.guidance == 3.0
    null = resolve(GenerateRequest(labels=[None, 4], seed=0), LIMITS, FACTS)
    assert null.conditioning == {"labels": [None, 4]} and null.n == 2
    random_seed = resolve(GenerateRequest(labels=[0], n=4), LIMITS, FACTS)
    assert 0 <= random_seed.seeds[0] <= 2**32 - 1
    replay = resolve(GenerateRequest(**plan.params()), LIMITS, FACTS)  # params replay
    assert replay.params() == plan.params()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 51}, "steps"),
        ({"steps": 0}, "steps"),
        ({"n": 9}, "n"),
        ({"labels": [10]}, "labels"),
        ({"labels": [1], "guidance": 10.5}, "guidance"),
        ({"labels": [1], "guidance": -1}, "guidance"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64 - 1, "n": 2}, "seed"),
        ({"seeds": [1, 2], "n": 3}, "seeds"),
        ({"seed": 1, "seeds": [1]}, "seeds"),
        ({"sampler": "heun"}, "sampler"),
        ({"sampler": "ddim", "options": {"nope": 1}}, "options"),
        ({"n": 2, "response_format": "png"}, "response_format"),
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"colour": "red"}, "colour"),
        ({"labels": [1, "2"]}, "labels"),
        ({"sampler": "dpmpp_2m", "options": {"eta": 0.5}}, "options"),
    ],
)
def test_every_limit_is_a_field_level_error(body, field):
    with pytest.raises(RequestInvalid) as e:
        resolve(parse_body(json.dumps(body).encode(), LIMITS), LIMITS, FACTS)
    assert e.value.reason == "validation"
    assert any(err["loc"][:2] == ["body", field] for err in e.value.errors), e.value.errors


@pytest.mark.parametrize(
    "raw",
    [
        b'{"guidance": NaN}',
        b'{"guidance": Infinity}',
        b'{"steps": "10"}',
        b'{"steps": 10.0}',
        b'{"n": true}',
        b"[1, 2]",
        b"not json",
        b'{"options": {"eta": "1"}}',
    ],
)
def test_malformed_bodies_are_422_with_a_location(raw):
    with pytest.raises(RequestInvalid) as e:
        parse_body(raw, LIMITS)
    assert e.value.reason == "validation" and all(err["loc"][0] == "body" for err in e.value.errors)


def test_oversized_body_is_413():
    with pytest.raises(RequestInvalid) as e:
        parse_body(b" " * (LIMITS.max_body_bytes + 1), LIMITS)
    assert e.value.reason == "body_too_large"


def test_unconditional_model_refuses_labels_and_guidance():
    facts = fake_model(0)
    with pytest.raises(RequestInvalid, match="unconditional"):
        resolve(GenerateRequest(labels=[0]), LIMITS, facts)
    with pytest.raises(RequestInvalid, match="guidance must be 1"):
        resolve(GenerateRequest(guidance=2.0), LIMITS, facts)
    plan = resolve(GenerateRequest(n=2), LIMITS, facts)
    assert plan.conditioning == {} and plan.guidance == 1.0  # the model's default 3 does not apply


# -- access and rate limits -----------------------------------------------------------------------


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.8.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("testclient") and not is_loopback(None)


def test_authorize_matrix():
    cfg = ServiceConfig(
        api_keys=[
            ApiKey(id="gen", sha256=hash_key("g-key"), scopes=("generate",)),
            ApiKey(id="ops", sha256=hash_key("a-key"), scopes=("admin",)),
        ]
    )
    ac = AccessControl(cfg)
    bearer = lambda k: {"authorization": f"Bearer {k}"}  # noqa: E731
    assert ac.authorize(bearer("g-key"), "10.0.0.1", "generate").key_id == "gen"
    assert ac.authorize({"x-api-key": "a-key"}, "10.0.0.1", "admin").key_id == "ops"
    for headers, host, scope, reason in [
        ({}, "10.0.0.1", "generate", "unauthorized"),
        (bearer("wrong"), "10.0.0.1", "generate", "unauthorized"),
        ({}, "127.0.0.1", "generate", "unauthorized"),  # keys configured: loopback needs one
        (bearer("a-key"), "10.0.0.1", "generate", "forbidden"),
        (bearer("g-key"), "10.0.0.1", "admin", "forbidden"),
        ({}, "10.0.0.1", "admin", "unauthorized"),
    ]:
        with pytest.raises(AccessDenied) as e:
            ac.authorize(headers, host, scope)
        assert e.value.reason == reason, (headers, host, scope)
        assert "key" not in e.value.public_detail or reason == "forbidden"
    assert ac.authorize({}, "127.0.0.1", "admin").loopback  # metrics from loopback, no key
    open_ac = AccessControl(ServiceConfig())
    assert open_ac.authorize({}, "::1", "generate").key_id == "loopback"
    with pytest.raises(AccessDenied) as e:
        open_ac.authorize({}, "192.168.1.2", "generate")
    assert e.value.reason == "forbidden"


def test_token_bucket_per_key():
    clock = FakeClock()
    cfg = ServiceConfig(
        rate_limit=RateLimit(per_second=2, burst=3),
        api_keys=[
            ApiKey(id="a", sha256=hash_key("a")),
            ApiKey(id="b", sha256=hash_key("b"), rate_limit=RateLimit(per_second=1, burst=1)),
        ],
    )
    rl = RateLimiter(cfg, clock=clock)
    assert [rl.acquire("a") for _ in range(3)] == [None, None, None]
    wait = rl.acquire("a")
    assert wait == pytest.approx(0.5)
    assert rl.acquire("b") is None and rl.acquire("b") == pytest.approx(1.0)
    clock.t += 0.5
    assert rl.acquire("a") is None and rl.acquire("a") is not None
    assert RateLimiter(ServiceConfig()).acquire("anyone") is None


# -- idempotency ----------------------------------------------------------------------------------


def test_idempotency_claim_conflict_replay_release():
    store = IdempotencyStore(max_entries=2)
    body = b'{"seed": 1, "n": 2}'
    assert store.claim("k", "x", body) is None
    with pytest.raises(IdempotencyConflict) as e:
        store.claim("k", "x", body)
    assert e.value.reason == "idempotency_conflict"
    with pytest.raises(IdempotencyConflict) as e:
        store.claim("k", "x", b'{"seed": 2}')
    assert e.value.reason == "idempotency_mismatch"
    resp = StoredResponse(b"png", "image/png", {"X-Request-Id": "r"})
    store.complete("k", "x", resp)
    assert store.claim("k", "x", b'{"n": 2, "seed": 1}') == resp  # same JSON, other key order
    assert store.claim("other-key-id", "x", body) is None  # scoped per API key id
    store.release("other-key-id", "x")
    assert store.claim("other-key-id", "x", body) is None  # released: runs again


# -- audit ------------------------------------------------------------------------------------------


def _entry(i: int) -> AuditEntry:
    return AuditEntry(
        f"req-{i}", "ok", 200, {"seeds": [i]}, 12.5, key_id="alice", output_sha256="ab" * 32
    )


def test_audit_chain_verifies_and_detects_an_edited_row(tmp_path):
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    for i in range(5):
        log.append(_entry(i))
    assert log.verify().ok and log.verify().rows == 5
    assert log.get("req-3")["params"] == {"seeds": [3]}
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log._db.execute("UPDATE audit SET status = 'x' WHERE seq = 2")
    log.close()
    # an attacker with file access drops the trigger and edits
    tamper_sqlite(
        path,
        "DROP TRIGGER audit_no_update",
        "UPDATE audit SET params = '{\"seeds\":[99]}' WHERE seq = 3",
    )
    reopened = AuditLog(path)
    v = reopened.verify()
    assert not v.ok and v.first_bad_seq == 3 and "hash" in v.reason
    reopened.close()


def test_audit_detects_a_deleted_row_and_survives_reopen(tmp_path):
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    for i in range(3):
        log.append(_entry(i))
    head = log.head()
    log.close()
    again = AuditLog(path)  # appends continue the chain after a restart
    assert again.head() == head
    again.append(_entry(3))
    assert again.verify().ok and again.verify().rows == 4
    again.close()
    tamper_sqlite(
        path,
        "DROP TRIGGER audit_no_delete",
        "DELETE FROM audit WHERE seq = 2",
    )
    v = AuditLog(path).verify()
    assert not v.ok and v.first_bad_seq == 3


# -- routing --------------------------------------------------------------------------------------


class _FakeModel:
    def __init__(self, sha: str, classes: int = 10, shape=(1, 8, 8)):
        self.sha256, self.name = sha * 64, f"m{sha}"
        self.num_classes, self.image_shape = classes, shape
        self.spec = ConditioningSpec.for_classes(classes)


def _ready(model) -> ModelVersion:
    return ModelVersion(model, plan=BatchPlan("pad", 8))


def test_canary_share_is_stable_and_close_to_the_share():
    router = ModelRouter(_ready(_FakeModel("a")))
    router.set_canary(_ready(_FakeModel("b")), share=0.25)
    keys = [f"alice:{seed}" for seed in range(2000)]
    first = [router.route(k)[0] for k in keys]
    assert first == [router.route(k)[0] for k in keys]  # stable
    assert 0.2 < first.count("canary") / len(keys) < 0.3
    assert all(0 <= routing_fraction(k) < 1 for k in keys[:50])
    router.set_canary(None)
    assert {router.route(k)[0] for k in keys[:100]} == {"production"}


def test_router_refuses_cold_or_incompatible_versions():
    router = ModelRouter(_ready(_FakeModel("a")))
    with pytest.raises(InvalidArgumentError, match="warmed"):
        router.swap(ModelVersion(_FakeModel("b")))
    with pytest.raises(InvalidArgumentError, match="classes"):
        router.set_canary(_ready(_FakeModel("c", classes=3)), 0.5)
    old = router.swap(_ready(_FakeModel("d")))
    assert old.id == "a" * 12 and router.production.id == "d" * 12


# -- batch-invariance probe -----------------------------------------------------------------------


class _PositionDependentModel:
    """A denoiser whose output depends on a row's position when the batch is large: what a
    thread split in a batched kernel does to the last bits."""

    spec = ConditioningSpec()
    image_shape = latent_shape = (1, 4, 4)
    sample_latents = Model.sample_latents  # the real sampler call over this fake's denoiser
    layout = layout_config = None  # no layout stage

    def __init__(self, bad_from: int | None):
        from difforge.core.processes import make_process

        self.process = make_process({"kind": "ve", "sigma_min": 0.01, "sigma_max": 10.0})
        self.bad_from = bad_from

    def denoiser(self, x, sigma, cond=None):
        out = x / (1 + sigma.view(-1, 1, 1, 1) ** 2)
        if self.bad_from is not None and x.shape[0] > self.bad_from:
            out = out.clone()
            out[self.bad_from :] += 1e-6
        return out


def test_probe_finds_position_dependence_and_falls_back_to_per_sample():
    key = BatchKey("v", "euler", 2, "karras", (1, 4, 4), False)
    clean = probe(_PositionDependentModel(None), key, 6)
    assert clean.invariant and clean.positions == (0, 1, 2, 3, 4, 5)
    bad = probe(_PositionDependentModel(4), key, 6)
    assert bad.differing == (4, 5) and bad.max_abs_diff > 0
    plan = choose_plan(_PositionDependentModel(4), [key], "pad", 6)
    assert plan.mode == "per_sample" and plan.micro(False) == 1 and plan.invariant
    assert choose_plan(_PositionDependentModel(None), [key], "pad", 6).mode == "pad"
    assert not choose_plan(_PositionDependentModel(4), [key], "off", 6).invariant
    assert probe_positions(32) == (0, 1, 16, 31)


def test_batch_plan_counts_guidance_twice():
    plan = BatchPlan("pad", 8)
    assert plan.micro(False) == 8 and plan.micro(True) == 4
    assert BatchPlan("pad", 1).micro(True) == 1
    assert BatchPlan("per_sample", 8).micro(False) == 1


_THREADS_PROBE = """
import os, sys, time, torch
torch.set_num_threads(2)
from difforge.model import load
from difforge.serving import ServiceConfig
from difforge.serving.app import build_service
count = lambda: len(os.listdir("/proc/self/task"))
before = count()
build_service(sys.argv[1], ServiceConfig(audit_db=":memory:"))
for _ in range(200):  # the passing thread's OpenMP team exits after the thread: give it time
    if count() == before:
        break
    time.sleep(0.05)
after_service = count()
load(sys.argv[1])  # the control: the same load on this thread leaves its OpenMP team behind
print(before, after_service, count())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_build_service_leaves_no_openmp_team_on_the_calling_thread():
    """Torch work of the serving process stays on the sampler thread: a second thread's OpenMP
    team halves throughput on a small CPU (see difforge.serving.engine.on_passing_thread)."""
    model = Path(__file__).resolve().parents[2] / "models" / "mnist-cond"  # tensors big enough
    out = subprocess.run(  # to run parallel copies; a fresh process has no team yet
        [sys.executable, "-c", _THREADS_PROBE, str(model)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    before, after_service, after_direct = map(int, out.stdout.split())
    assert after_service == before
    assert after_direct > before


def test_every_outcome_reason_has_exactly_one_http_status_in_the_app():
    from difforge.serving.app import HTTP_STATUS
    from difforge.serving.metrics import ERROR_REASONS
    from difforge.serving.service import ServiceError

    assert set(ERROR_REASONS) | {"ok", "held"} == set(HTTP_STATUS)
    err = ServiceError("queue_full", "the queue is full", retry_after=2.0)
    assert not hasattr(err, "status") and (err.reason, err.retry_after) == ("queue_full", 2.0)
