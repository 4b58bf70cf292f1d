"""The drawing page in headless Chromium: draw digits with the mouse, read the prediction.

Needs Debian's chromium at /usr/bin/chromium (skipped without it unless DIGITLAB_REQUIRE_BROWSER=1).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("DIGITLAB_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

# Strokes in the page's 280x280 canvas units, one list of points per pen-down.
STROKES = {
    "1": [[(140, 45), (140, 235)]],
    "7": [[(80, 60), (200, 60), (120, 230)]],
    "0": [[(140, 50), (98, 75), (85, 140), (98, 205), (140, 230), (182, 205), (195, 140), (182, 75),
           (140, 50)]],
}


def _require_browser() -> None:
    required = os.environ.get("DIGITLAB_REQUIRE_BROWSER") == "1"
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} not found (`make browser` installs Debian's chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright Python package is not installed (`make setup` installs it)"
    if problem:
        if required:
            pytest.fail(f"DIGITLAB_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def live_url(tiny_run: Path) -> Iterator[str]:
    """The app for `tiny_run` under uvicorn in a thread, on a free loopback port."""
    _require_browser()
    import uvicorn

    from digitlab.serve import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the socket is handed to uvicorn: no race for the port
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_run), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def _open(browser, url: str, width: int, height: int, external: list[str]):
    """A fresh page whose every request to a non-loopback host is recorded and aborted."""
    context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)

    def guard(route) -> None:
        parsed = urlparse(route.request.url)
        if parsed.scheme in ("data", "blob") or parsed.hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.on("request", lambda r: None if urlparse(r.url).scheme in ("data", "blob")
            or urlparse(r.url).hostname in LOCAL_HOSTS else external.append(r.url))
    page.goto(url + "/", wait_until="networkidle")
    return context, page


def _draw(page, strokes: list[list[tuple[int, int]]]) -> str:
    """Draw stroke by stroke with the mouse; returns the digit the page shows once settled."""
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    scale = box["width"] / 280

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x * scale, box["y"] + y * scale

    for stroke in strokes:
        page.mouse.move(*at(*stroke[0]))
        page.mouse.down()
        for point in stroke[1:]:
            page.mouse.move(*at(*point), steps=8)
        page.mouse.up()
    page.wait_for_selector('body[data-busy="0"][data-digit]', timeout=10_000)
    return page.inner_text("#digit")


def test_draw_digits_and_see_them_recognised(browser, live_url: str) -> None:
    external: list[str] = []
    context, page = _open(browser, live_url, 1000, 760, external)
    try:
        page.wait_for_function("document.getElementById('model-info').textContent.includes('model')")
        for digit, strokes in STROKES.items():
            assert _draw(page, strokes) == digit, f"drew a {digit}"
            # the bar chart and the 28x28 preview follow the answer
            assert page.locator("#bars li.best .name").inner_text() == digit
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-page-desktop.png"), full_page=True)
        seen_ink = page.evaluate(
            "() => { const d = document.getElementById('seen').getContext('2d').getImageData(0, 0, 28, 28).data;"
            " let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i]; return s; }")
        assert seen_ink > 0, "the model's 28x28 view is drawn"
        page.click("#clear")
        assert page.inner_text("#digit") == "–"
    finally:
        context.close()
    assert external == [], f"the page contacted non-local hosts: {external}"


def test_phone_width_canvas_fits(browser, live_url: str) -> None:
    external: list[str] = []
    context, page = _open(browser, live_url, 390, 844, external)
    try:
        box = page.locator("#pad").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        assert box["width"] >= 250, "the canvas stays big enough to draw on"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scrolling"
        assert _draw(page, STROKES["7"]) == "7"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-page-phone.png"), full_page=True)
    finally:
        context.close()
    assert external == [], f"the page contacted non-local hosts: {external}"


def _touch_stroke(cdp, points: list[tuple[float, float]]) -> None:
    """A quick finger stroke through `points` (page pixels), as raw touch events."""
    x0, y0 = points[0]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x0, "y": y0}]})
    for x, y in points[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def _ink_on_pad(page) -> int:
    return page.evaluate(
        "() => { const d = document.getElementById('pad').getContext('2d').getImageData(0, 0, 280, 280).data;"
        " let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i]; return s; }")


def test_phone_tap_on_clear_right_after_a_stroke_clears(browser, live_url: str) -> None:
    external: list[str] = []
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1,
                                  has_touch=True, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(live_url + "/", wait_until="networkidle")
        cdp = context.new_cdp_session(page)
        pad = page.locator("#pad").bounding_box()
        button = page.locator("#clear").bounding_box()
        centre = (button["x"] + button["width"] / 2, button["y"] + button["height"] / 2)
        swallowed = 0
        for i in range(5):
            x0 = pad["x"] + pad["width"] * (0.3 + 0.1 * i)
            _touch_stroke(cdp, [(x0, pad["y"] + pad["height"] * f) for f in (0.2, 0.4, 0.6, 0.8)])
            assert _ink_on_pad(page) > 0, "the finger drew"
            page.wait_for_timeout(50)
            page.touchscreen.tap(*centre)
            page.wait_for_timeout(100)
            swallowed += _ink_on_pad(page) > 0
        assert swallowed == 0, f"{swallowed} of 5 taps on Clear 50 ms after a stroke did nothing"
        assert page.inner_text("#digit") == "–"
    finally:
        context.close()
    assert external == []


def test_one_rounding_and_an_unsure_answer(browser, live_url: str) -> None:
    external: list[str] = []
    context, page = _open(browser, live_url, 1000, 760, external)
    try:
        _draw(page, STROKES["1"])
        sentence = page.inner_text("#confidence").removesuffix(" sure")
        assert page.locator("#bars li.best .pct").inner_text() == sentence, "one probability, one rounding"
        # a dot is not a digit: the page says so instead of naming one
        assert _draw(page, [[(140, 140), (142, 141)]]) == "?"
        assert "doesn't look like a digit" in page.inner_text("#confidence")
        assert page.locator("#bars li.best").count() == 0
    finally:
        context.close()
    assert external == [], f"the page contacted non-local hosts: {external}"


def test_report_on_a_phone_fits_and_mistake_captions_are_readable(browser, tiny_run: Path, tmp_path: Path) -> None:
    import numpy as np

    from digitlab.data import load_mnist
    from digitlab.report import write_report

    data = load_mnist("test")
    report = write_report(tiny_run, data.subset(np.arange(500), "mnist:test[:500]"), tmp_path / "report.html")
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1,
                                  has_touch=True, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(report.as_uri(), wait_until="load")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scrolling"
        sizes = page.evaluate("[...document.querySelectorAll('.mistakes figcaption')]"
                              ".map(e => parseFloat(getComputedStyle(e).fontSize))")
        assert sizes and min(sizes) >= 11, sizes
    finally:
        context.close()
