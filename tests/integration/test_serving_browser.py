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
    sync_api = _playwright()
    from PIL import Image, ImageStat

    from difforge.serving import create_app

    svc = make_service(make_tiny_model(tmp_path / "tiny"), torch_threads=1, warmup_steps=1)
    with ServerThread(create_app(svc)) as url, sync_api.sync_playwright() as pw:
        wait_ready(svc)
        slow_down(svc, 0.03)  # 30 steps take about a second: long enough to see progress
        browser = launch(pw, tmp_path, viewport={"width": 900, "height": 700})
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#cond-labels option').length === 12")
            assert "tiny" in page.inner_text("#model")
            page.select_option("#cond-labels", "7")
            page.fill("#n", "3")
            page.fill("#steps", "30")
            page.select_option("#sampler", "euler")
            page.fill("#seed", "123")
            page.click("#go")
            page.wait_for_function(
                "(() => { const p = document.getElementById('progress');"
                " return p.value > 0 && p.value < 1; })()",
                timeout=30_000,
            )
            assert "sampling" in page.inner_text("#status") or "queued" in page.inner_text(
                "#status"
            )
            page.wait_for_selector("#gallery figure:nth-child(3) img", timeout=60_000)
            captions = page.locator("#gallery figcaption").all_inner_texts()
            assert len(captions) == 3
            for i, text in enumerate(captions):
                assert f"seed {123 + i}" in text and "labels 7" in text
                assert "synthetic image" in text and "euler" in text
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
        finally:
            browser.close()


def test_web_page_inpaints_an_uploaded_image_with_before_and_after(tmp_path):
    sync_api = _playwright()
    import base64

    import numpy as np
    import torch

    from difforge.common.png import png_bytes, png_pixels
    from difforge.serving import create_app

    init = torch.randint(0, 256, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[:, 4:] = 255  # generate the lower half
    (tmp_path / "in.png").write_bytes(png_bytes(init.to(torch.uint8)))
    (tmp_path / "mask.png").write_bytes(png_bytes(mask))
    svc = make_service(make_tiny_model(tmp_path / "tiny"), torch_threads=1, warmup_steps=1)
    with ServerThread(create_app(svc)) as url, sync_api.sync_playwright() as pw:
        wait_ready(svc)
        browser = launch(pw, tmp_path)
        try:
            page = browser.new_page()
            page.goto(url + "/")
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
        finally:
            browser.close()


def test_web_page_offers_the_served_adapters(tmp_path):
    sync_api = _playwright()
    pytest.importorskip("peft", reason="LoRA adapters need peft")
    from difforge.serving import create_app
    from difforge.serving.app import build_service
    from difforge.serving.config import ServiceConfig
    from difforge.training.lora import LoraTrainConfig, train_lora
    from tests.integration.test_lora import thick_data

    model_dir = make_tiny_model(tmp_path / "tiny")
    config = LoraTrainConfig(name="bars", rank=2, steps=2, batch_size=4, target_modules=("qkv",))
    train_lora(model_dir, config, tmp_path / "bars", data=thick_data(16))
    service_config = ServiceConfig(audit_db=":memory:", torch_threads=1, warmup_steps=1)
    svc = build_service(model_dir, service_config, [("bars", str(tmp_path / "bars"), 1.0)])
    with ServerThread(create_app(svc)) as url, sync_api.sync_playwright() as pw:
        wait_ready(svc)
        browser = launch(pw, tmp_path)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#adapter option').length === 2")
            page.select_option("#adapter", "bars")
            page.fill("#n", "1")
            page.fill("#steps", "2")
            page.click("#go")
            page.wait_for_selector("#gallery figure img", timeout=60_000)
            assert "+ bars" in page.inner_text("#gallery figcaption")
        finally:
            browser.close()


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
    try:
        from playwright import sync_api
    except ImportError:
        skip_unless_real("the page test needs the playwright package (pip install -e '.[dev]')")
    from difforge.serving import create_app

    svc = make_service(_tiny_series_model(tmp_path / "series"), torch_threads=1, warmup_steps=1)
    with ServerThread(create_app(svc)) as url, sync_api.sync_playwright() as pw:
        browser = launch(pw, tmp_path)
        try:
            page = browser.new_page()
            page.goto(url + "/")
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
        finally:
            browser.close()


def test_web_page_allows_a_degraded_answer_and_says_so(tmp_path):
    sync_api = _playwright()
    from difforge.serving import create_app
    from difforge.serving.breaker import BreakerConfig

    breaker = BreakerConfig(latency_slo_s=0.001, min_samples=1, cooldown_s=3600, degraded_steps=2)
    svc = make_service(
        make_tiny_model(tmp_path / "tiny"), torch_threads=1, warmup_steps=1, breaker=breaker
    )
    svc.fallback.breaker.record("normal", 0.0, 1.0)  # one slow request: the breaker is open
    with ServerThread(create_app(svc)) as url, sync_api.sync_playwright() as pw:
        wait_ready(svc)
        browser = launch(pw, tmp_path)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
            page.fill("#n", "1")
            page.fill("#steps", "4")
            page.check("#degraded")
            page.click("#go")
            page.wait_for_selector("#gallery figure img", timeout=60_000)
            status = page.inner_text("#status")
            assert "degraded under load (steps=2; asked 4 steps)" in status, status
        finally:
            browser.close()
