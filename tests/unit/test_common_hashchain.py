"""The shared hash chain: formats that keep old logs verifying, and a verifier that names every
broken row."""

from __future__ import annotations

import math

import pytest

from difforge.common.hashchain import (
    GENESIS,
    ChainFormat,
    Link,
    canonical_json,
    verify,
)
from tests.helpers import tamper_sqlite

PREFIX = ChainFormat(prev_key=None, ascii_only=True, allow_nan=True)  # the serving log's format
EMBED = ChainFormat(prev_key="prev_hash")  # the registry's format


def _chain(fmt: ChainFormat, n: int) -> list[Link]:
    links, prev = [], GENESIS
    for seq in range(1, n + 1):
        content = {"seq": seq, "what": f"row {seq}", "n": seq * 1.5}
        digest = fmt.hash(prev, content)
        links.append(Link(seq, prev, digest, content, label="act"))
        prev = digest
    return links


def _edit(link: Link, **changes) -> Link:
    return Link(link.seq, link.prev_hash, link.hash, {**link.content, **changes}, link.label)


def test_canonical_json_is_sorted_compact_and_strict_by_default():
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'
    assert canonical_json({"a": "é"}, ascii_only=True) == '{"a":"\\u00e9"}'
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})
    assert canonical_json({"x": math.nan}, allow_nan=True) == '{"x":NaN}'


def test_hashes_of_existing_logs_are_unchanged():
    # Golden values computed with the serving and registry audit code before they shared this
    # module: a changed hash would make every stored chain fail to verify.
    serving = {
        "seq": 1,
        "request_id": "req-é",
        "created": "2026-01-01T00:00:00.000+00:00",
        "params": "{}",
        "latency_ms": 1.5,
    }
    assert (
        PREFIX.hash(GENESIS, serving)
        == "4f45b70ff4ec8c4a3145723a91c6ce39862c654839e62310091797d63f12927b"
    )
    registry = {
        "seq": 1,
        "at": "2026-01-01T00:00:00.000000+00:00",
        "actor": "alice",
        "action": "register",
        "name": "m",
        "version": 1,
        "details": '{"k":"é"}',
    }
    assert (
        EMBED.hash(GENESIS, registry)
        == "4a3910dbf43bdf88fe07e28cc057fdc77296d61b4877eace9fff72725c5eca6a"
    )


@pytest.mark.parametrize("fmt", [PREFIX, EMBED])
def test_an_intact_chain_verifies_and_reports_its_head(fmt):
    links = _chain(fmt, 5)
    report = verify(links, fmt)
    assert report.ok and report.rows == 5 and report.head == links[-1].hash
    empty = verify([], fmt)
    assert empty.ok and empty.rows == 0 and empty.head == GENESIS


@pytest.mark.parametrize("fmt", [PREFIX, EMBED])
def test_several_edited_rows_are_all_reported(fmt):
    links = _chain(fmt, 6)
    links[1], links[4] = _edit(links[1], what="forged"), _edit(links[4], n=0.0)
    report = verify(links, fmt, noun="audit entry", plural="audit entries")
    assert not report.ok
    assert [(p.seq, p.kind) for p in report.problems] == [(2, "edited"), (5, "edited")]
    assert report.problems[0].message.startswith("audit entry 2 (act) was edited")


def test_deleted_rows_and_a_rehashed_row_are_each_reported():
    links = _chain(EMBED, 7)
    # rows 3 and 4 deleted; row 6 rewritten with a fresh hash over a forged previous hash
    forged = {**links[5].content, "what": "forged"}
    rehashed = Link(6, "f" * 64, EMBED.hash("f" * 64, forged), forged)
    kept = [links[0], links[1], links[4], rehashed, links[6]]
    problems = verify(kept, EMBED).problems
    assert [(p.seq, p.kind) for p in problems] == [
        (5, "missing"),
        (5, "unlinked"),
        (6, "unlinked"),
        (7, "unlinked"),
    ]
    assert problems[0].message == "rows 3..4 are missing"
    assert problems[1].message == "row 5 does not link to row 4"


def test_a_row_hashed_in_the_other_format_does_not_verify():
    links = _chain(PREFIX, 3)
    assert verify(links, PREFIX).ok
    assert [p.kind for p in verify(links, EMBED).problems] == ["edited"] * 3


def test_the_serving_audit_log_reports_every_edited_row(tmp_path):
    from difforge.serving.audit import AuditEntry, AuditLog

    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    for i in range(4):
        log.append(AuditEntry(f"req-{i}", "ok", 200, {"prompt": f"café {i}"}, 1.0))
    log.close()
    tamper_sqlite(
        path,
        "DROP TRIGGER audit_no_update",
        "UPDATE audit SET status = 'error' WHERE seq IN (2, 4)",
    )
    v = AuditLog(path).verify()
    assert not v.ok and v.rows == 4 and v.first_bad_seq == 2
    assert len(v.problems) == 2 and v.problems[1].startswith("row 4 was edited")
