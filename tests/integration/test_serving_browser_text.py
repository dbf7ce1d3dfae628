"""The web page's prompt boxes for a text model, in headless Chromium (skips without it)."""

from __future__ import annotations

from tests.integration.serving_fixtures import make_service
from tests.integration.test_serving_browser import (  # noqa: F401  (the autouse fixture)
    _chromium_present,
    served_page,
)
from tests.text_fixtures import make_tiny_text_model


def test_web_page_sends_prompt_and_negative_prompt(tmp_path):

    svc = make_service(
        make_tiny_text_model(tmp_path / "tiny-text"), torch_threads=1, warmup_steps=1
    )
    with served_page(svc, tmp_path) as (page, _url):
        page.wait_for_selector("#cond-prompt")
        assert page.get_attribute("#cond-prompt", "placeholder") == "default: a 7"
        page.fill("#cond-prompt", "a thick 7")
        page.fill("#cond-negative_prompt", "a 3")
        page.fill("#n", "2")
        page.fill("#steps", "2")
        page.click("#go")
        page.wait_for_selector("#gallery figure:nth-child(2) img", timeout=60_000)
        captions = page.locator("#gallery figcaption").all_inner_texts()
        assert all("a thick 7" in c and "a 3" in c for c in captions), captions
        page.fill("#cond-prompt", "a \u0007 7")  # a control character: the 422 is shown
        page.click("#go")
        page.wait_for_function(
            "document.getElementById('status').innerText.includes('control character')",
            timeout=30_000,
        )
