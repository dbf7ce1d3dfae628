"""The web page's upscale control for an upsampler, in headless Chromium (skips without it):
an uploaded low-resolution PNG goes to POST /v1/upscale, the page shows it (before) and the
upscaled images (after), the same bytes as the library."""

from __future__ import annotations

import base64

import numpy as np

from difforge.common.png import png_bytes, png_pixels
from difforge.pipeline import load
from tests.integration.serving_fixtures import make_service
from tests.integration.test_serving_browser import (  # noqa: F401  (the autouse fixture)
    _chromium_present,
    served_page,
)
from tests.upscale_fixtures import low_res_images, make_tiny_upsampler


def test_web_page_upscales_an_uploaded_image_with_before_and_after(tmp_path):

    up_dir = make_tiny_upsampler(tmp_path / "tiny-up")
    low = low_res_images(1, seed=3)[0]
    (tmp_path / "low.png").write_bytes(png_bytes(low))
    library = load(up_dir).upscale(low, seeds=[42, 43])
    svc = make_service(up_dir, torch_threads=1, warmup_steps=1)
    with served_page(svc, tmp_path) as (page, _url):
        page.wait_for_selector("#cond-low_res")
        page.fill("#n", "2")
        page.fill("#seed", "42")
        page.set_input_files("#cond-low_res", str(tmp_path / "low.png"))
        page.click("#go")
        page.wait_for_selector("#gallery figure:nth-child(2) img", timeout=60_000)
        assert page.is_visible("#before-img")
        before = page.get_attribute("#before-img", "src")
        shown = png_pixels(base64.b64decode(before.split(",", 1)[1]))
        assert np.array_equal(shown.reshape(8, 8), low[0].numpy())
        captions = page.locator("#gallery figcaption").all_inner_texts()
        assert all("input sha256" in t and "level 0.1" in t for t in captions), captions
        srcs = page.eval_on_selector_all("#gallery img", "els => els.map(e => e.src)")
        for i, src in enumerate(srcs):
            px = png_pixels(base64.b64decode(src.split(",", 1)[1]))
            assert np.array_equal(px.reshape(16, 16), library.images[i, 0].numpy())
