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
    try:
        from playwright import sync_api
    except ImportError:
        skip_unless_real("the page test needs the playwright package (pip install -e '.[dev]')")
    from PIL import Image, ImageStat

    from difforge.serving import create_app

    svc = make_service(make_tiny_model(tmp_path / "tiny"), torch_threads=1, warmup_steps=1)
    with ServerThread(create_app(svc)) as url, sync_api.sync_playwright() as pw:
        deadline = time.monotonic() + 60
        while not svc.ready:
            assert time.monotonic() < deadline, "model did not warm up"
            time.sleep(0.05)
        slow_down(svc, 0.03)  # 30 steps take about a second: long enough to see progress
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 900, "height": 700},
        )
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
