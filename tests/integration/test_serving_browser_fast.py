"""The page's Fast toggle, in headless Chromium: a student served beside production."""

from __future__ import annotations

from tests.distill_fixtures import make_student, make_teacher
from tests.integration.test_serving_browser import (  # noqa: F401  (the autouse skip fixture)
    _chromium_present,
    served_page,
)


def test_web_page_fast_toggle_asks_the_student(tmp_path):
    from difforge.serving.app import build_service
    from difforge.serving.config import ServiceConfig

    teacher = make_teacher(tmp_path / "teacher")
    student = make_student(teacher, tmp_path / "student")
    config = ServiceConfig(audit_db=":memory:", torch_threads=1, warmup_steps=1)
    svc = build_service(teacher, config, fast=student)
    with served_page(svc, tmp_path) as (page, _url):
        page.wait_for_selector("#fast")
        assert page.input_value("#steps") == "6"  # the teacher's defaults
        page.check("#fast")
        assert page.input_value("#steps") == "2" and page.input_value("#sampler") == "euler"
        page.fill("#n", "2")
        page.click("#go")
        page.wait_for_selector("#gallery figure:nth-child(2) img", timeout=60_000)
        captions = page.locator("#gallery figcaption").all_inner_texts()
        assert all("tiny-teacher-progressive" in t and "euler" in t for t in captions), captions
