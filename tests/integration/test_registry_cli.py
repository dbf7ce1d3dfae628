"""`difforge registry ...` end to end, in-process, on a SQLite registry of tiny models."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from difforge.cli import app
from tests.integration.test_registry import make_model, report


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()
    base = ["registry", "--registry", f"sqlite:///{tmp_path}/reg.db"]

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, [*base, *map(str, args)])
        assert result.exit_code == code, result.output
        return result

    return run


def test_register_promote_rollback_verify(cli, tmp_path):
    a = make_model(tmp_path / "a", 0)
    b = make_model(tmp_path / "b", 1)
    (tmp_path / "good.json").write_text(json.dumps(report(10.0)))
    (tmp_path / "worse.json").write_text(json.dumps(report(12.0)))
    assert (
        "registered m:v1"
        in cli("register", a, "--name", "m", "--report", tmp_path / "good.json").stdout
    )
    assert "already registered as m:v1" in cli("register", a, "--name", "m").stdout
    cli("register", b, "--name", "m")
    assert (
        "attached report to m 2: fid 12" in cli("report", "m", "2", tmp_path / "worse.json").stdout
    )

    out = cli("promote", "m", "1").stdout
    assert "pass  smoke_sample" in out and "production of m is now v1" in out
    refused = cli("promote", "m", "v2", code=2)
    assert refused.stderr.strip() == (
        "error: promotion of m v2 to production refused: fid_max_ratio_to_production: "
        "fid 12 > 1.1 x production v1's FID 10 = 11 (over by 1)"
    )
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps({"fid_max_ratio_to_production": 1.25, "smoke_sample": False}))
    assert "now v2 (was v1)" in cli("promote", "m", "2", "--gates", gates).stdout

    listing = cli("list", "m").stdout.splitlines()
    assert listing[0].startswith("v1\t") and listing[1].endswith("fid 12\tproduction")
    assert cli("list").stdout.strip() == "m\tproduction v2\tcanary -"
    shown = json.loads(cli("show", "m", "production").stdout)
    assert (shown["version"], shown["dataset_hash"], shown["aliases"]) == (
        2,
        "sha256:feed",
        ["production"],
    )

    assert "rolled back to v1" in cli("rollback", "m", "--reason", "drift").stdout
    assert "staging of m is now v2" in cli("alias", "m", "staging", "2").stdout
    log = cli("audit", "m").stdout.splitlines()
    assert [line.split("\t")[3] for line in log][-3:] == ["promote", "rollback", "alias_set"]
    verified = cli("verify").stdout  # the two versions share one config.json blob
    assert verified.startswith("ok: 9 audit entries, 2 versions, 7 artifacts; head ")


def test_canary_share_and_removal(cli, tmp_path):
    for seed in range(2):
        folder = make_model(tmp_path / f"m{seed}", seed, report(10.0))
        cli("register", folder, "--name", "m")
    cli("promote", "m", "1", "--gates", _no_smoke(tmp_path))
    cli("promote", "m", "2", "--to", "canary", "--percent", "5", "--gates", _no_smoke(tmp_path))
    assert cli("list").stdout.strip() == "m\tproduction v1\tcanary v2 (5%)"
    assert "now gets 30%" in cli("alias", "m", "canary", "--percent", "30").stdout
    assert "removed canary of m (was v2)" in cli("alias", "m", "canary", "--delete").stdout


def test_tampering_fails_verify_with_exit_1(cli, tmp_path):
    cli("register", make_model(tmp_path / "a", 0), "--name", "m")
    blobs = [p for p in (tmp_path / "reg-artifacts" / "sha256").rglob("*") if p.is_file()]
    assert len(blobs) == 4  # the artifacts sit beside reg.db by default
    for p in blobs:  # truncate every stored file
        p.chmod(0o644)
        p.write_bytes(b"")
    result = cli("verify", code=1)
    assert "registry verification failed (4 problems)" in result.stderr
    assert result.stderr.count("problem: artifact ") == 4
    assert "refusing to promote m:v1" in cli("promote", "m", "1", code=2).stderr


def test_errors_are_one_line(cli, tmp_path):
    assert cli("show", "nope", code=2).stderr == "error: no model named 'nope' in the registry\n"
    assert "bad alias 'v2'" in cli("alias", "nope", "v2", "1", code=2).stderr
    missing = cli("register", tmp_path / "missing", code=2).stderr
    assert missing.startswith("error: model not found") and missing.count("\n") == 1
    runner = CliRunner()
    args = ["registry", "--registry", "postgresql+psycopg://x@127.0.0.1:1/db", "list"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: registry") and result.stderr.count("\n") == 1


def _no_smoke(tmp_path) -> str:
    path = tmp_path / "no_smoke.json"
    path.write_text(json.dumps({"smoke_sample": False}))
    return str(path)
