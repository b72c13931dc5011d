"""End to end: ``vlm-guard demo`` on the shipped default model, driven in Debian's headless Chromium.

Starts the CLI on a free loopback port, picks a bundled example, generates, waits for both answers and
the heatmap, clicks an ordinary word and a flagged one, saves a screenshot (``$VLM_GUARD_SCREENSHOT`` or a
temporary file), generates a one-token answer, then uploads a corrupt file and expects one readable
refusal with the old answers cleared. Every request the page makes is recorded: none may leave the
demo's own server (the page must work offline).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the ``playwright`` Python package;
no browser is downloaded. Run: ``pytest -m browser tests/test_demo_browser.py``.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
# the screenshot goes to $VLM_GUARD_SCREENSHOT when set (docs/demo.png was made with
# `VLM_GUARD_SCREENSHOT=docs/demo.png bash scripts/test.sh -m browser`), else into the test's temporary folder
SCREENSHOT_ENV = "VLM_GUARD_SCREENSHOT"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_SECONDS = 60

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)"),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def demo_url(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "vlm_guard.cli", "demo", "--host", "127.0.0.1", "--port", str(port)]
    # VLM_GUARD_DEMO_TEST_MODEL: debugging aid to point the test at another model; CI leaves it unset
    if os.environ.get("VLM_GUARD_DEMO_TEST_MODEL"):
        command += ["--model", os.environ["VLM_GUARD_DEMO_TEST_MODEL"]]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer on {url} within {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_demo_generates_in_chromium(demo_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1200},
        )
        requested: list[str] = []
        context.on("request", lambda request: requested.append(request.url))
        try:
            page = context.new_page()
            page.goto(demo_url, wait_until="load")
            page.wait_for_selector("#generate-btn", timeout=30_000)

            # pick the first bundled example
            page.locator("#examples-gallery button.thumbnail-item").first.click()
            page.wait_for_selector("#input-preview img", timeout=20_000)
            sync_api.expect(page.locator("#ground-truth")).to_contain_text("Ground-truth objects", timeout=10_000)

            # a short answer keeps the test quick on a busy CPU
            tokens = page.locator("#max-new-tokens input[type=number]")
            tokens.fill("24")
            tokens.press("Enter")
            page.click("#generate-btn")
            sync_api.expect(page.locator("#run-status")).to_contain_text("Done.", timeout=60_000)
            page.wait_for_selector("#attention-heatmap img", timeout=20_000)
            plain = page.locator("#plain-answer").inner_text()
            guarded = page.locator("#guarded-answer").inner_text()
            sync_api.expect(page.locator("#plain-header")).to_contain_text(" s · ")
            sync_api.expect(page.locator("#guarded-header")).to_contain_text(" s · ")
            token_count = int(page.locator("#plain-header").inner_text().split(" s · ")[1].split()[0])
            assert 1 <= token_count <= 24, token_count
            assert page.locator(".toast-body.error").count() == 0
            assert plain.strip() and guarded.strip(), (plain, guarded)

            # every generated token is clickable, not only the checker's object words (issue 17 item 9)
            guarded_tokens = page.locator("#guarded-answer .textfield .token")
            count = guarded_tokens.count()
            assert count >= 2, count
            assert all(guarded_tokens.nth(i).get_attribute("role") == "button" for i in range(count))
            plain_word = page.evaluate(
                """() => [...document.querySelectorAll('#guarded-answer .textfield .token')]
                       .findIndex(t => !/255, 80, 80|60, 192, 96|255, 176, 32/.test(t.getAttribute('style') || ''))"""
            )
            assert plain_word >= 0, "no uncoloured word in the answer"
            guarded_tokens.nth(plain_word).click()
            sync_api.expect(page.locator("#token-info")).to_contain_text(f"token {plain_word + 1}/", timeout=10_000)

            # and a word the checker flagged (if any) says so
            flagged = page.evaluate(
                """() => [...document.querySelectorAll('#guarded-answer .textfield .token')]
                       .findIndex(t => (t.getAttribute('style') || '').includes('255, 80, 80'))"""
            )
            if flagged >= 0:
                guarded_tokens.nth(flagged).click()
                sync_api.expect(page.locator("#token-info")).to_contain_text(f"token {flagged + 1}/", timeout=10_000)
                sync_api.expect(page.locator("#token-info")).to_contain_text("flagged")

            screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "demo.png")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000

            # a one-token answer arrives (issue 17 item 6: it used to fail with a slider error and was lost)
            tokens.fill("1")
            tokens.press("Enter")
            page.click("#generate-btn")
            sync_api.expect(page.locator("#plain-header")).to_contain_text(" s · 1 tokens", timeout=60_000)
            sync_api.expect(page.locator("#run-status")).to_contain_text("Done.")
            assert page.locator("#guarded-answer .textfield .token").count() == 1
            assert page.locator(".toast-body.error").count() == 0

            # a corrupt upload gets one readable refusal, and no stale answer stays beside it (item 9)
            broken = tmp_path / "broken.png"
            broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not image data" * 50)
            page.locator("#image-upload input[type=file]").set_input_files(str(broken))
            status = page.locator("#run-status")
            sync_api.expect(status).to_contain_text("Upload refused", timeout=20_000)
            sync_api.expect(status).to_contain_text("not a readable image")
            assert "Traceback" not in status.inner_text()
            sync_api.expect(page.locator("#image-upload")).not_to_contain_text("broken.png", timeout=10_000)
            sync_api.expect(page.locator("#guarded-answer .textfield .token")).to_have_count(0, timeout=10_000)
            assert page.locator("#plain-answer .textfield .token").count() == 0
            assert " s · " not in page.locator("#plain-header").inner_text()
            assert page.locator("#attention-heatmap img").count() == 0
            # pressing Generate now: one message, no red error badge on every panel
            page.click("#generate-btn")
            sync_api.expect(status).to_contain_text("Input refused", timeout=20_000)
            page.wait_for_timeout(500)
            assert page.locator(".toast-body.error").count() == 0
            badges = page.evaluate("() => [...document.querySelectorAll('.error')].filter(e => e.offsetParent !== null).length")
            assert badges == 0, f"{badges} error badges on the page"
            refused_screenshot = tmp_path / "refused.png"
            page.screenshot(path=str(refused_screenshot), full_page=True)

            # the page works offline: every request went to the demo's own server (item 9: no font host)
            outside = sorted({url for url in requested if not url.startswith((demo_url, "data:", "blob:"))})
            assert not outside, f"the page requested other hosts: {outside}"
            linked = page.evaluate("""() => [...document.querySelectorAll('script[src], link[href]')]
                                       .map(e => e.src || e.href).filter(u => !u.startsWith(location.origin))""")
            assert not linked, f"the page links other hosts (scripts, preconnects): {linked}"
        finally:
            context.close()
