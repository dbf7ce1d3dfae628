"""The review queue from the outside: the web page shows a held request and, once approved over
the CLI (`difforge review`), its images; against a real uvicorn on a loopback socket."""

from __future__ import annotations

import json

import pytest

from difforge.serving import ServiceConfig
from tests.integration.serving_fixtures import make_service, make_tiny_model
from tests.integration.test_serving_browser import (
    _chromium_present,  # noqa: F401  (autouse: skips without chromium)
    served_page,
)

RULES = [{"kind": "conditioning", "key": "labels", "equals": [7], "name": "claims a product"}]
FILTERS = {"stage": [{"name": "policy", "options": {"rules": RULES}}]}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from difforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_page_shows_held_then_approved_images_and_the_cli_reviews(tmp_path, capsys):
    config = ServiceConfig(audit_db=":memory:", torch_threads=1, warmup_steps=1, filters=FILTERS)
    svc = make_service(make_tiny_model(tmp_path / "tiny"), config)
    with served_page(svc, tmp_path, viewport={"width": 900, "height": 700}) as (page, url):
        page.wait_for_function("document.querySelectorAll('#cond-labels option').length === 12")
        page.select_option("#cond-labels", "7")
        page.fill("#n", "2")
        page.fill("#steps", "4")
        page.click("#go")
        page.wait_for_function(
            "document.getElementById('status').textContent.includes('held for review')",
            timeout=30_000,
        )
        assert page.locator("#gallery img").count() == 0  # nothing shown before approval

        code, out, _ = _cli(capsys, "review", "list", "--url", url)
        assert code == 0 and "1 pending" in out and "claims a product: labels=7" in out
        rid = out.splitlines()[1].split()[0]
        code, out, _ = _cli(
            capsys, "review", "show", rid, "--url", url, "--out", str(tmp_path / "h.json")
        )
        assert code == 0 and json.loads((tmp_path / "h.json").read_text())["request_id"] == rid
        code, out, _ = _cli(capsys, "review", "approve", rid, "--url", url, "--note", "ok")
        assert code == 0 and f"{rid}: approved by loopback" in out
        code, _, err = _cli(capsys, "review", "reject", rid, "--url", url)
        assert code == 2 and err.startswith("error: HTTP 409")

        page.wait_for_selector("#gallery figure:nth-child(2) img", timeout=30_000)
        captions = page.locator("#gallery figcaption").all_inner_texts()
        assert all("labels 7" in c and "approved by a reviewer" in c for c in captions)
    code, _, err = _cli(capsys, "review", "list", "--url", url)  # the server is gone
    assert code == 2 and err.startswith("error: ") and err[-1] == "\n" and err.count("\n") == 1
