"""The web page at GET /, in headless Chromium (Debian's `chromium`, driven by Playwright).

Skips when chromium or the playwright package is missing (a failure under
DIFFORGE_REQUIRE_REAL=1, as .ci/run sets). Never runs `playwright install`: the browser is the
system's.
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from tests.helpers import skip_unless_real
from tests.integration.serving_fixtures import make_service, make_tiny_model, slow_down

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(autouse=True)
def _chromium_present():
    if shutil.which("chromium") is None:
        skip_unless_real("headless browser test needs Debian's chromium (apt-get install chromium)")


def _playwright():
    try:
        from playwright import sync_api
    except ImportError:
        skip_unless_real("the page test needs the playwright package (pip install -e '.[dev]')")
    return sync_api


def launch(pw, tmp_path, **options):
    """Debian's Chromium, headless, with a fresh profile (--user-data-dir) under tmp_path."""
    return pw.chromium.launch_persistent_context(
        str(tmp_path / "profile"),
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        headless=True,
        **options,
    )


@contextmanager
def served_page(svc, tmp_path, **options):
    """`svc` on a loopback port and, once it is ready, a headless Chromium page open at its "/":
    yields (page, url); `options` go to `launch`."""
    sync_api = _playwright()
    from difforge.serving import create_app

    with ServerThread(create_app(svc)) as url, sync_api.sync_playwright() as pw:
        wait_ready(svc)
        browser = launch(pw, tmp_path, **options)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            yield page, url
        finally:
            browser.close()


def wait_ready(svc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not svc.ready:
        assert time.monotonic() < deadline, "model did not warm up"
        time.sleep(0.05)


class ServerThread:
    """uvicorn on a loopback socket in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def test_web_page_generates_images_with_provenance_and_progress(tmp_path):
    from PIL import Image, ImageStat

    svc = make_service(make_tiny_model(tmp_path / "tiny"), torch_threads=1, warmup_steps=1)
    with served_page(svc, tmp_path, viewport={"width": 900, "height": 700}) as (page, _url):
        slow_down(svc, 0.03)  # 30 steps take about a second: long enough to see progress
        page.wait_for_function("document.querySelectorAll('#cond-labels option').length === 12")
        assert "tiny" in page.inner_text("#model")
        page.select_option("#cond-labels", "7")
        page.fill("#n", "3")
        page.fill("#steps", "30")
        page.select_option("#sampler", "euler")
        assert "model default (karras)" in page.inner_text("#grid")
        page.select_option("#grid", "vp_time_mid")
        page.fill("#seed", "123")
        page.click("#go")
        page.wait_for_function(
            "(() => { const p = document.getElementById('progress');"
            " return p.value > 0 && p.value < 1; })()",
            timeout=30_000,
        )
        assert "sampling" in page.inner_text("#status") or "queued" in page.inner_text("#status")
        page.wait_for_selector("#gallery figure:nth-child(3) img", timeout=60_000)
        captions = page.locator("#gallery figcaption").all_inner_texts()
        assert len(captions) == 3
        for i, text in enumerate(captions):
            assert f"seed {123 + i}" in text and "labels 7" in text
            assert "synthetic image" in text and "euler" in text and "grid vp_time_mid" in text
        loaded = page.evaluate(
            "Array.from(document.querySelectorAll('#gallery img')).every(i => i.naturalWidth === 8)"
        )
        assert loaded
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L")
        stat = ImageStat.Stat(shot)
        assert stat.stddev[0] > 10, "the screenshot is blank"
        extrema = shot.getextrema()
        assert extrema[1] - extrema[0] > 100
        (tmp_path / "page.png").write_bytes(page.screenshot())


def test_web_page_inpaints_an_uploaded_image_with_before_and_after(tmp_path):
    import base64

    import numpy as np
    import torch

    from difforge.common.png import png_bytes, png_pixels

    init = torch.randint(0, 256, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[:, 4:] = 255  # generate the lower half
    (tmp_path / "in.png").write_bytes(png_bytes(init.to(torch.uint8)))
    (tmp_path / "mask.png").write_bytes(png_bytes(mask))
    svc = make_service(make_tiny_model(tmp_path / "tiny"), torch_threads=1, warmup_steps=1)
    with served_page(svc, tmp_path) as (page, _url):
        page.wait_for_function("document.querySelectorAll('#cond-labels option').length === 12")
        page.fill("#n", "2")
        page.fill("#steps", "4")
        page.set_input_files("#init", str(tmp_path / "in.png"))
        page.set_input_files("#mask", str(tmp_path / "mask.png"))
        page.fill("#strength", "0.6")  # a range input takes fill
        assert page.inner_text("#strength-value") == "0.6"
        page.click("#go")
        page.wait_for_selector("#gallery figure:nth-child(2) img", timeout=60_000)
        assert page.is_visible("#before-img") and page.is_visible("#before-mask")
        captions = page.locator("#gallery figcaption").all_inner_texts()
        assert all("strength 0.6" in t and "init sha256" in t for t in captions), captions
        srcs = page.eval_on_selector_all("#gallery img", "els => els.map(e => e.src)")
        for src in srcs:  # the kept upper half is the uploaded image's, to the byte
            px = png_pixels(base64.b64decode(src.split(",", 1)[1]))
            assert np.array_equal(px[:4], init[0, :4].numpy())


def test_web_page_draws_a_mask_over_the_init_image(tmp_path):
    """Strokes on the canvas become the request's `mask` PNG, pixel for pixel; Clear empties it."""
    import base64
    import json

    import numpy as np
    import torch

    from difforge.common.png import png_bytes, png_pixels

    init = torch.randint(0, 256, (1, 8, 8), generator=torch.Generator().manual_seed(1))
    (tmp_path / "in.png").write_bytes(png_bytes(init.to(torch.uint8)))
    svc = make_service(make_tiny_model(tmp_path / "tiny"), torch_threads=1, warmup_steps=1)

    def drag(page, points):  # image-pixel coordinates -> a mouse stroke over the canvas
        box = page.locator("#mask-canvas").bounding_box()
        at = [
            (box["x"] + x / 8 * box["width"], box["y"] + y / 8 * box["height"]) for x, y in points
        ]
        page.mouse.move(*at[0])
        page.mouse.down()
        for p in at[1:]:
            page.mouse.move(*p, steps=12)
        page.mouse.up()

    def generate(page) -> tuple[dict, list[np.ndarray]]:
        with page.expect_request("**/v1/generate") as req:
            page.click("#go")
        page.wait_for_selector("#gallery figure:nth-child(2) img", timeout=60_000)
        srcs = page.eval_on_selector_all("#gallery img", "els => els.map(e => e.src)")
        return json.loads(req.value.post_data), [
            png_pixels(base64.b64decode(s.split(",", 1)[1])) for s in srcs
        ]

    with served_page(svc, tmp_path) as (page, _url):
        page.wait_for_function("document.querySelectorAll('#cond-labels option').length === 12")
        assert not page.is_visible("#mask-canvas")
        page.fill("#n", "2")
        page.fill("#steps", "4")
        page.set_input_files("#init", str(tmp_path / "in.png"))
        page.wait_for_function("document.getElementById('mask-canvas').width === 8")
        page.fill("#brush", "2")
        assert page.inner_text("#brush-value") == "2"
        drag(page, [(0.2, 5.0), (7.8, 5.0)])  # brush 2 on a row boundary: rows 4 and 5
        drag(page, [(7.8, 7.0), (0.2, 7.0)])  # rows 6 and 7: the lower half
        body, outs = generate(page)
        sent = png_pixels(base64.b64decode(body["mask"]))
        sent = sent if sent.ndim == 2 else sent[..., 0]
        want = np.zeros((8, 8), np.uint8)
        want[4:] = 255
        assert np.array_equal(sent, want), sent
        assert body["strength"] == 0.8 and body["init_image"]
        assert page.is_visible("#before-mask")
        for px in outs:  # the kept upper half is the uploaded image's, to the byte
            assert np.array_equal(px[:4], init[0, :4].numpy())
        assert any(not np.array_equal(px[4:], init[0, 4:].numpy()) for px in outs)

        page.click("#mask-clear")
        page.fill("#brush", "1")
        drag(page, [(1.5, 0.3), (1.5, 7.7)])  # brush 1: column 1 only
        body, outs = generate(page)
        sent = png_pixels(base64.b64decode(body["mask"]))
        sent = sent if sent.ndim == 2 else sent[..., 0]
        want = np.zeros((8, 8), np.uint8)
        want[:, 1] = 255
        assert np.array_equal(sent, want), sent
        for px in outs:
            assert np.array_equal(np.delete(px, 1, axis=1), np.delete(init[0].numpy(), 1, 1))

        page.click("#mask-clear")  # nothing painted and no file: no mask (img2img)
        body, _ = generate(page)
        assert "mask" not in body and body["init_image"]


def test_web_page_offers_the_served_adapters(tmp_path):
    pytest.importorskip("peft", reason="LoRA adapters need peft")
    from difforge.serving.app import build_service
    from difforge.serving.config import ServiceConfig
    from difforge.training.lora import LoraTrainConfig, train_lora
    from tests.integration.test_lora import thick_data

    model_dir = make_tiny_model(tmp_path / "tiny")
    config = LoraTrainConfig(name="bars", rank=2, steps=2, batch_size=4, target_modules=("qkv",))
    train_lora(model_dir, config, tmp_path / "bars", data=thick_data(16))
    service_config = ServiceConfig(audit_db=":memory:", torch_threads=1, warmup_steps=1)
    svc = build_service(model_dir, service_config, [("bars", str(tmp_path / "bars"), 1.0)])
    with served_page(svc, tmp_path) as (page, _url):
        page.wait_for_function("document.querySelectorAll('#adapter option').length === 2")
        page.select_option("#adapter", "bars")
        page.fill("#n", "1")
        page.fill("#steps", "2")
        page.click("#go")
        page.wait_for_selector("#gallery figure img", timeout=60_000)
        assert "+ bars" in page.inner_text("#gallery figcaption")


def _tiny_series_model(folder):
    import torch

    from difforge.nets import build_net
    from difforge.pipeline import ModelConfig, NetSpec, SamplingDefaults, save_model

    cfg = {"length": 16, "base_channels": 8, "channel_mults": [1, 2], "attention_resolutions": [8]}
    cfg |= {"head_dim": 8, "norm_groups": 4, "num_classes": 3}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_net("unet1d", cfg)
    config = ModelConfig(
        name="tiny-series",
        net=NetSpec(kind="unet1d", config=cfg),
        process={"kind": "ve", "sigma_min": 0.01, "sigma_max": 10.0},
        parameterization="edm",
        num_classes=3,
        image_shape=(1, 16),
        sampling=SamplingDefaults(sampler="euler", steps=3, guidance=1.0),
    )
    return save_model(folder, config, net.state_dict(), "# tiny-series\n")


def test_web_page_plots_series_of_a_series_model(tmp_path):

    svc = make_service(_tiny_series_model(tmp_path / "series"), torch_threads=1, warmup_steps=1)
    with served_page(svc, tmp_path) as (page, _url):
        page.wait_for_function("document.querySelectorAll('#cond-labels option').length === 5")
        wait_ready(svc)
        page.fill("#n", "2")
        page.click("#go")
        page.wait_for_selector("#gallery figure:nth-child(2) svg polyline", timeout=60_000)
        points = page.evaluate(
            "document.querySelector('#gallery svg polyline').getAttribute('points')"
        )
        assert len(points.split()) == 16  # one vertex per time step
        assert "labels 0" in page.locator("#gallery figcaption").first.inner_text()


def test_web_page_allows_a_degraded_answer_and_says_so(tmp_path):
    from difforge.serving.breaker import BreakerConfig

    breaker = BreakerConfig(latency_slo_s=0.001, min_samples=1, cooldown_s=3600, degraded_steps=2)
    svc = make_service(
        make_tiny_model(tmp_path / "tiny"), torch_threads=1, warmup_steps=1, breaker=breaker
    )
    svc.fallback.breaker.record("normal", 0.0, 1.0)  # one slow request: the breaker is open
    with served_page(svc, tmp_path) as (page, _url):
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
        page.fill("#n", "1")
        page.fill("#steps", "4")
        page.check("#degraded")
        page.click("#go")
        page.wait_for_selector("#gallery figure img", timeout=60_000)
        status = page.inner_text("#status")
        assert "degraded under load (steps=2; asked 4 steps)" in status, status
