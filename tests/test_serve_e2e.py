"""``diffloom serve`` in a real browser: Debian's headless Chromium, driven by Playwright, against a uvicorn server.

The flow a user follows: type a prompt, press Generate, watch the previews and get the final image; start a
longer run, reload the tab in the middle of it (the page follows the run again) and press Stop; reload and find
both results in the gallery; "use these settings" fills the form.

Playwright's own browser download is never used (it cannot download here): the test launches
/usr/bin/chromium (``apt-get install chromium``; ``.ci/run`` installs it).

With ``DIFFLOOM_SCREENSHOTS=FOLDER`` set, the test also writes ``serve-running.png`` (a run in progress) and
``serve-done.png`` (a finished run and the gallery) there; the ones in docs/ were made this way.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from diffloom_serve.app import create_app
from diffloom_serve.engine import Engine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_url(tmp_path):
    engine = Engine.load(None, tmp_path / "outputs")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, trusted_hosts=["127.0.0.1"]), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    engine.close()


def state_is(state: str) -> str:
    return f"document.getElementById('state').dataset.state === '{state}'"


def test_generate_watch_stop_and_find_both_in_the_gallery(server_url):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium with `apt-get install -y chromium` "
                    f"(.ci/run does); Playwright drives it through its executable path")
    from playwright.sync_api import sync_playwright

    shots = os.environ.get("DIFFLOOM_SCREENSHOTS")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(server_url)
            page.wait_for_function("document.getElementById('scheduler').options.length > 0")
            assert page.input_value("#steps") == "20" and page.input_value("#width") == "128"

            # A run to the end: previews, then the final image and its seed.
            page.fill("#prompt", "a red circle on a white background")
            page.fill("#steps", "12")
            page.click("#generate")
            page.wait_for_function(state_is("done"))
            assert int(page.get_attribute("#preview", "data-frames")) == 12  # a preview per step
            assert page.get_attribute("#preview", "src").startswith("/outputs/")
            page.wait_for_function("document.getElementById('preview').complete")
            assert page.evaluate("document.getElementById('preview').naturalWidth") == 128
            assert re.fullmatch(r"Seed \d+", page.text_content("#seed-used"))
            page.wait_for_function("document.querySelectorAll('#gallery .item').length === 1")

            # A long run, stopped early: it ends, and shows the image of the steps it made.
            page.fill("#prompt", "a blue square on a black background")
            page.fill("#steps", "150")
            page.click("#generate")
            page.wait_for_function("Number(document.getElementById('preview').dataset.frames) >= 40")
            page.reload()  # the tab picks the run up again: its events are replayed, then follow live
            page.wait_for_function("Number(document.getElementById('preview').dataset.frames) >= 90")
            assert page.input_value("#prompt") == "a blue square on a black background"
            assert page.get_attribute("#preview", "src").startswith("data:image/png")  # a live preview
            page.click("#stop")
            page.wait_for_function(state_is("stopped"))
            stopped_after = int(re.search(r"Stopped after step (\d+) of 150", page.text_content("#state"))[1])
            assert 90 <= stopped_after < 150
            assert page.get_attribute("#preview", "src").startswith("/outputs/")
            assert not page.is_disabled("#generate") and page.is_disabled("#stop")

            # After a reload both are in the gallery, newest first, and their settings fill the form.
            page.reload()
            page.wait_for_function("document.querySelectorAll('#gallery .item').length === 2")
            prompts = page.locator("#gallery .item .prompt").all_text_contents()
            assert prompts == ["a blue square on a black background", "a red circle on a white background"]
            assert "stopped at" in page.locator("#gallery .item .meta").first.text_content()
            page.locator("#gallery .item button").nth(1).click()
            assert page.input_value("#prompt") == "a red circle on a white background"
            assert page.input_value("#steps") == "12" and re.fullmatch(r"\d+", page.input_value("#seed"))

            if shots:  # late in a run, where the preview shows the shape, and when it is done
                page.fill("#prompt", "a yellow triangle on a gray background")
                page.fill("#steps", "40")
                page.fill("#seed", "7")
                page.click("#generate")
                page.wait_for_function("Number(document.getElementById('preview').dataset.frames) >= 34")
                page.screenshot(path=str(Path(shots) / "serve-running.png"), full_page=True)
                page.wait_for_function(state_is("done"))
                page.wait_for_function("document.querySelectorAll('#gallery .item').length === 3")
                page.wait_for_function("[...document.images].every((image) => image.complete)")
                page.screenshot(path=str(Path(shots) / "serve-done.png"), full_page=True)
        finally:
            browser.close()
