"""The model registry end to end on tiny U-Nets: SQLite always, PostgreSQL when one is reachable.

Set DIFFORGE_TEST_POSTGRES_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres) to
run every test here against PostgreSQL too; each test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from difforge.model import ModelConfig, NetSpec, save_model
from difforge.nets import UNetConfig, build_net
from difforge.registry import (
    ArtifactIntegrityError,
    ConflictError,
    GateFailedError,
    NotFoundError,
    Registry,
    RegistryError,
)
from tests.helpers import skip_unless_real

PG_ENV = "DIFFORGE_TEST_POSTGRES_URL"
TINY = UNetConfig(
    in_channels=1, out_channels=1, image_size=8, base_channels=8, channel_mults=(1,),
    num_res_blocks=1, attention_resolutions=(), head_dim=8, num_classes=2, norm_groups=4,
    emb_mult=1,
)  # fmt: skip
NO_SMOKE = {"smoke_sample": False}


def make_model(
    folder: Path, seed: int, report: dict | None = None, *, poison: bool = False, name: str = "tiny"
) -> Path:
    """A tiny class-conditional flow model folder, optionally with eval.json beside its files.

    poison: finite weights whose output overflows float32 when sampled (a NaN-producing model).
    """
    torch.manual_seed(seed)
    net = build_net("unet", TINY)
    weights = net.state_dict()
    if poison:
        weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], 3e38)
    config = ModelConfig(
        name=name,
        net=NetSpec(kind="unet", config=TINY.to_dict()),
        process={"kind": "flow"},
        parameterization="velocity",
        num_classes=2,
        image_shape=(1, 8, 8),
        provenance={"dataset_hash": "sha256:feed", "code_version": "abc123", "step": 7},
    )
    save_model(folder, config, weights, f"# {name}\n\nseed {seed}\n")
    if report is not None:
        (folder / "eval.json").write_text(json.dumps(report))
    return folder


def report(fid: float, acc: float = 0.99, mem: float = 0.0, n: int = 1000) -> dict:
    return {
        "num_samples": n,
        "metrics": {"fid": fid, "label_accuracy": acc, "memorization_rate": mem},
        "extractor": {"name": "mnist-lenet", "sha256": "e" * 64},
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    """A fresh, empty registry database URL for each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/registry.db"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        skip_unless_real(f"PostgreSQL tests need {PG_ENV}=postgresql+psycopg://user@host:port/db")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip_unless_real("PostgreSQL tests need psycopg (pip install psycopg)")
    schema = f"difforge_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def open_registry(registry_url, tmp_path):
    """Open (and at the end close) registries on the test's database."""
    opened: list[Registry] = []

    def _open(**kwargs) -> Registry:
        reg = Registry(registry_url, tmp_path / "artifacts", **kwargs)
        opened.append(reg)
        return reg

    yield _open
    for reg in opened:
        reg.close()


@pytest.fixture
def reg(open_registry) -> Registry:
    return open_registry()


def drop_append_only_guard(reg: Registry) -> None:
    """What someone with write access to the database would do before editing the audit log."""
    with reg.engine.begin() as conn:
        if reg.engine.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER audit_log_no_update"))
        else:
            conn.execute(text("DROP TRIGGER audit_log_append_only ON audit_log"))


# --- registration --------------------------------------------------------------------------


def test_register_records_provenance_and_reports(reg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"net": {"kind": "unet"}, "batch_size": 8}))
    (run / "metrics.jsonl").write_text('{"step": 5, "loss": 0.5}\n{"step": 7, "loss": 0.4}\n')
    folder = make_model(run / "model", 0, report(10.0))
    r = reg.register(folder, "mnist")
    assert (r.version, r.created, r.reports_added) == (1, True, 1)
    v = r.info
    assert v.ref == "mnist:v1" and v.config["name"] == "tiny"
    assert v.dataset_hash == "sha256:feed" and v.code_version == "abc123"
    assert v.training_config == {"net": {"kind": "unet"}, "batch_size": 8}
    assert v.training_metrics == {"step": 7, "last_logged": {"step": 7, "loss": 0.4}}
    assert v.card.startswith("# tiny") and v.metrics["fid"] == 10.0
    assert set(v.files) == {"config.json", "model.safetensors", "README.md", "manifest.json"}
    for sha in v.files.values():  # content-addressed copies, not the source folder
        assert reg.store.check(sha) is None


def test_reregistering_identical_weights_returns_the_existing_version(reg, tmp_path):
    a = reg.register(make_model(tmp_path / "a", 0), "m")
    again = reg.register(make_model(tmp_path / "copy", 0), "m")  # same bytes, other folder
    assert (again.version, again.created) == (a.version, False)
    late = reg.register(tmp_path / "copy", "m", reports=[report(9.0)])  # report added later
    assert (late.version, late.created, late.reports_added) == (1, False, 1)
    assert reg.register(make_model(tmp_path / "b", 1), "m").version == 2
    assert [e.action for e in reg.audit_log("m")] == ["register", "report", "register"]


def test_same_weights_with_another_config_conflict(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0), "m")
    with pytest.raises(ConflictError, match="already registered as m v1"):
        reg.register(make_model(tmp_path / "b", 0, name="renamed"), "m")


def test_a_report_for_other_weights_is_refused(reg, tmp_path):
    bad = {**report(10.0), "model_sha256": "0" * 64}
    with pytest.raises(ConflictError, match="is for weights 000000000000"):
        reg.register(make_model(tmp_path / "a", 0), "m", reports=[bad])


def test_unknown_names_versions_and_aliases(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0), "m")
    with pytest.raises(NotFoundError, match="no model named 'nope'"):
        reg.get("nope")
    with pytest.raises(NotFoundError, match="m has no version 7"):
        reg.get("m", "v7")
    with pytest.raises(NotFoundError, match="m has no alias 'production'"):
        reg.load_version("m", "production")


# --- promotion gates -----------------------------------------------------------------------


def test_gates_pass_and_the_smoke_sample_loads_from_the_registry(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0, report(20.0)), "m")
    gates = {"fid_max": 30, "label_accuracy_min": 0.95, "memorization_max": 0.01}
    p = reg.promote("m", 1, gates=gates)
    assert [g.gate for g in p.gates] == [
        "fid_max", "fid_max_ratio_to_production", "label_accuracy_min", "memorization_max",
        "smoke_sample",
    ]  # fmt: skip
    assert all(g.passed for g in p.gates) and p.gates[0].margin == pytest.approx(10.0)
    assert reg.resolve("m").production.version == 1
    assert reg.load_version("m", "production").sha256 == p.info.weights_sha256


def test_failed_gate_refuses_names_gate_and_margin_and_keeps_alias(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0, report(10.0)), "m")
    reg.register(make_model(tmp_path / "b", 1, report(12.5, acc=0.9)), "m")
    reg.promote("m", 1, gates=NO_SMOKE)
    gates = {**NO_SMOKE, "label_accuracy_min": 0.95}
    with pytest.raises(GateFailedError) as err:
        reg.promote("m", 2, gates=gates)
    msg = str(err.value)
    assert "promotion of m v2 to production refused" in msg
    assert "fid 12.5 > 1.1 x production v1's FID 10 = 11 (over by 1.5)" in msg
    assert "label_accuracy 0.9 < 0.95 (short by 0.05)" in msg
    assert {f.gate for f in err.value.failures} == {
        "fid_max_ratio_to_production",
        "label_accuracy_min",
    }
    assert reg.resolve("m").production.version == 1
    last = reg.audit_log("m")[-1]
    assert last.action == "promotion_refused" and last.version == 2
    assert reg.verify().ok


def test_promotion_needs_a_report(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0), "m")
    with pytest.raises(GateFailedError, match="report: no evaluation report"):
        reg.promote("m", 1, gates=NO_SMOKE)
    reg.attach_report("m", 1, report(10.0))
    assert reg.promote("m", 1, gates=NO_SMOKE).info.aliases == ("production",)


def test_fids_from_different_extractors_are_not_compared(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0, report(10.0)), "m")
    other = {**report(5.0), "extractor": {"sha256": "f" * 64}}
    reg.register(make_model(tmp_path / "b", 1, other), "m")
    reg.promote("m", 1, gates=NO_SMOKE)
    with pytest.raises(
        GateFailedError, match="FIDs not comparable, feature extractor ffffffffffff"
    ):
        reg.promote("m", 2, gates=NO_SMOKE)


def test_smoke_sample_refuses_a_model_that_samples_nan(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0, report(10.0), poison=True), "m")
    with pytest.raises(GateFailedError, match="smoke_sample: non-finite values at step 0"):
        reg.promote("m", 1)
    with pytest.raises(NotFoundError):
        reg.get("m", "production")


# --- aliases, rollback, canary -------------------------------------------------------------


def test_rollback_returns_production_to_the_previous_version(reg, tmp_path):
    for seed in range(3):
        reg.register(make_model(tmp_path / f"m{seed}", seed, report(10.0)), "m")
        reg.promote("m", seed + 1, gates=NO_SMOKE)
    assert reg.rollback("m", reason="bad outputs").version == 2
    assert reg.resolve("m").production.version == 2
    assert reg.rollback("m").version == 1
    with pytest.raises(RegistryError, match="no earlier production version of m"):
        reg.rollback("m")
    reg.promote("m", 3, gates=NO_SMOKE)
    assert reg.rollback("m").version == 1  # the rolled-back v2 stays rolled back
    entry = next(e for e in reg.audit_log("m") if e.action == "rollback")
    assert entry.details["from"] == 3 and entry.details["reason"] == "bad outputs"
    assert reg.verify().ok


def test_canary_resolve_share_and_auto_rollback(reg, tmp_path):
    for seed in range(2):
        reg.register(make_model(tmp_path / f"m{seed}", seed, report(10.0)), "m")
    reg.promote("m", 1, gates=NO_SMOKE)
    reg.promote("m", 2, to="canary", percent=25, gates=NO_SMOKE)
    res = reg.resolve("m")
    assert (res.production.version, res.canary.version, res.canary_percent) == (1, 2, 25.0)
    assert res.as_dict()["canary"] == (res.canary, 25.0)
    assert res.canary_share == 0.25
    assert reg.set_canary_percent("m", 50).canary_percent == 50.0
    with pytest.raises(ValueError, match="m v1 is production; a canary is another version"):
        reg.promote("m", 1, to="canary", gates=NO_SMOKE)
    assert reg.auto_rollback_canary("m", "error rate", expected_version=1) is None  # stale
    demoted = reg.auto_rollback_canary("m", "canary error rate 9% vs 1%")
    assert demoted.version == 2
    after = reg.resolve("m")
    assert after.canary is None and after.production.version == 1
    assert after.revision > res.revision
    entry = reg.audit_log("m")[-1]
    assert entry.action == "canary_rollback" and entry.details["reason"].startswith("canary error")


def test_promoting_the_canary_ends_it(reg, tmp_path):
    for seed in range(2):
        reg.register(make_model(tmp_path / f"m{seed}", seed, report(10.0)), "m")
    reg.promote("m", 1, gates=NO_SMOKE)
    reg.promote("m", 2, to="canary", gates=NO_SMOKE)
    reg.promote("m", "canary", gates=NO_SMOKE)
    res = reg.resolve("m")
    assert res.production.version == 2 and res.canary is None
    assert reg.verify().ok


def test_free_form_aliases(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0), "m")
    reg.register(make_model(tmp_path / "b", 1), "m")
    assert reg.set_alias("m", "staging", 1).aliases == ("staging",)
    reg.set_alias("m", "staging", "v2")
    assert reg.get("m", "staging").version == 2
    assert reg.rollback("m", "staging").version == 1
    assert reg.remove_alias("m", "staging") == 1
    with pytest.raises(ValueError, match="'production' is gated: use promote"):
        reg.set_alias("m", "production", 1)
    with pytest.raises(ValueError, match="bad alias 'v3'"):
        reg.set_alias("m", "v3", 1)
    assert reg.verify().ok


def test_concurrent_promotions_are_serialised(open_registry, tmp_path):
    setup = open_registry()
    n = 4
    for i in range(n):
        setup.register(make_model(tmp_path / f"m{i}", i, report(10.0)), "m")
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def promote(version: int) -> None:
        try:
            reg = open_registry()  # own engine, as a separate process would have
            barrier.wait()
            reg.promote("m", version, gates=NO_SMOKE)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(i + 1,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    promotions = [e for e in setup.audit_log("m") if e.action == "promote"]
    assert sorted(e.version for e in promotions) == list(range(1, n + 1))
    # each promotion saw the one before it: none was lost, none read a stale production
    assert [e.details["from"] for e in promotions] == [None] + [e.version for e in promotions[:-1]]
    assert setup.resolve("m").production.version == promotions[-1].version
    for e in reversed(promotions[:-1]):
        assert setup.rollback("m").version == e.version
    assert setup.verify().ok


# --- integrity and audit -------------------------------------------------------------------


def test_tampered_artifact_is_refused_audited_and_reported(reg, tmp_path):
    info = reg.register(make_model(tmp_path / "a", 0), "m").info
    blob = reg.store.path(info.weights_sha256)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"refusing to load m:v1: .*model.safetensors"):
        reg.load_version("m", 1)
    entry = reg.audit_log("m")[-1]
    assert entry.action == "integrity_failure" and "model.safetensors" in entry.details["files"]
    v = reg.verify()
    assert not v.ok and any(
        "model.safetensors of m v1" in p and "corrupted" in p for p in v.problems
    )
    reg.register(tmp_path / "a", "m")  # re-registering the original folder repairs the blob
    assert reg.verify().ok and reg.load_version("m", 1).sha256 == info.weights_sha256


def test_truncated_artifact_is_refused(reg, tmp_path):
    info = reg.register(make_model(tmp_path / "a", 0), "m").info
    blob = reg.store.path(info.weights_sha256)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(ArtifactIntegrityError, match="its 100 bytes hash to"):
        reg.load_version("m", "latest")


def test_audit_log_is_append_only(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0), "m")
    with pytest.raises(Exception, match="append-only"), reg.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET actor = 'mallory'"))
    with pytest.raises(Exception, match="append-only"), reg.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log"))
    assert reg.verify().ok


def test_verify_detects_an_edited_audit_row(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0, report(10.0)), "m")
    reg.promote("m", 1, gates=NO_SMOKE)
    v = reg.verify()
    assert v.ok and v.audit_entries == 3 and len(v.head) == 64
    drop_append_only_guard(reg)
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2"))
    problems = reg.verify().problems
    assert any("audit entry 2 (report) was edited" in p for p in problems), problems


def test_verify_detects_a_rehashed_row_and_edited_state_tables(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0, report(10.0)), "m")
    reg.register(make_model(tmp_path / "b", 1, report(10.0)), "m")
    reg.promote("m", 1, gates=NO_SMOKE)
    drop_append_only_guard(reg)
    with reg.engine.begin() as conn:  # an edit that also fixes the row's own hash
        conn.execute(text("UPDATE audit_log SET hash = :h WHERE seq = 1"), {"h": "a" * 64})
        conn.execute(
            text("UPDATE model_versions SET dataset_hash = 'sha256:other' WHERE version = 2")
        )
        conn.execute(text("UPDATE aliases SET version = 2 WHERE alias = 'production'"))
        conn.execute(text("UPDATE evaluation_reports SET report = '{\"fid\": 1}' WHERE id = 1"))
    problems = "\n".join(reg.verify().problems)
    assert "audit entry 2 does not link to entry 1" in problems
    assert "version m v2 was edited after it was registered" in problems
    assert "alias production of m points at v2 but the audit log says v1" in problems
    assert "evaluation report 1 of m v1 was edited" in problems


def test_promotion_without_the_smoke_sample_still_checks_every_artifact(reg, tmp_path):
    info = reg.register(make_model(tmp_path / "a", 0, report(10.0)), "m").info
    blob = reg.store.path(info.weights_sha256)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    for to in ("production", "canary"):
        with pytest.raises(ArtifactIntegrityError, match=r"refusing to promote m:v1: .*corrupted"):
            reg.promote("m", 1, to, gates=NO_SMOKE)
        entry = reg.audit_log("m")[-1]
        assert entry.action == "integrity_failure" and "model.safetensors" in entry.details["files"]
    with pytest.raises(NotFoundError):
        reg.get("m", "production")
    with pytest.raises(NotFoundError):
        reg.get("m", "canary")


def test_verify_records_what_it_finds_in_the_audit_log(reg, tmp_path):
    info = reg.register(make_model(tmp_path / "a", 0), "m").info
    assert reg.verify().ok and reg.audit_log("m")[-1].action == "register"
    blob = reg.store.path(info.weights_sha256)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:100])
    v = reg.verify()
    last = reg.audit_log()[-1]
    assert last.action == "verify_failed" and last.details["problems"] == v.problems
    assert last.details["count"] == len(v.problems) >= 1


def test_a_version_number_past_any_database_integer_is_not_found(reg, tmp_path):
    reg.register(make_model(tmp_path / "a", 0), "m")
    for ref in (2**63, 10**30, f"v{10**30}", -(10**30), 0):
        with pytest.raises(NotFoundError, match="m has no version"):
            reg.get("m", ref)
