"""The dashboard in a real browser: the system Chromium driven by Playwright. Load the page,
send a message, see tokens stream and get coloured, move a steering slider, see a crafted
guard fire; a screenshot is saved under the test's tmp dir."""

from __future__ import annotations

import json
import shutil

import pytest

from .test_serve import server, tiny_files  # noqa: F401 (fixtures)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail("the browser test needs the system Chromium: apt-get install -y chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_dashboard_streams_colours_steers_and_guards(browser, server, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("#colour-by option", state="attached")
    assert page.locator("#model").inner_text().startswith(json.loads(
        page.evaluate("fetch('/health').then(r => r.text())"))["model"])  # fmt: skip
    page.fill("#max-tokens", "120")
    page.evaluate("""() => {
        window.tokenBatches = 0;
        new MutationObserver((records) => {
            if (records.some((r) => [...r.addedNodes].some((n) => n.classList && n.classList.contains('tok'))))
                window.tokenBatches += 1;
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true});
    }""")  # fmt: skip

    # send a message: tokens stream in, one DOM update after another, each one coloured
    page.fill("#prompt", "Tell me a story.")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .meta >> text=finished", timeout=60_000)
    spans = page.locator(".msg.assistant .tok")
    count = spans.count()
    assert count == 120 and page.evaluate("window.tokenBatches") > 1
    backgrounds = [spans.nth(i).evaluate("n => n.style.background") for i in range(count)]
    assert all(b.startswith("rgba(") for b in backgrounds)
    assert any(not b.endswith(", 0)") for b in backgrounds)
    spans.nth(3).hover()
    assert page.locator("#tooltip tr").count() == 1 + 5  # hover: a header and the top 5
    assert page.locator("#trajectory polyline").count() >= 1
    assert page.locator("#map circle.reply-point").count() == 1

    # move a slider: the next reply is steered
    page.locator(".steer input[type=range]").first.fill("0.4")
    assert page.locator(".steer output").first.inner_text() == "+0.40"
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "And another one.")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.press("#prompt", "Enter")
    extension = json.loads(sent.value.post_data)["emolens"]
    assert extension["steer"] == {"calm": 0.4} and "top:5" in extension["read"]
    page.wait_for_selector(".msg.assistant >> nth=1 >> text=steered calm +0.40", timeout=60_000)

    # a crafted guard that must fire: any reading is above -100; the reply stops at token 2
    page.check("#guard-on")
    page.select_option("#g-when", "calm")
    page.fill("#g-threshold", "-100")
    page.fill("#g-window", "3")
    page.select_option("#g-then", "stop")
    assert json.loads(page.locator("#guard-json").inner_text()) == {
        "when": "calm", "above": -100, "window": 3, "then": "stop"}  # fmt: skip
    page.fill("#max-tokens", "40")
    page.fill("#prompt", "Once more, please.")
    page.press("#prompt", "Enter")
    page.wait_for_selector("text=stopped by the guard", timeout=60_000)
    last = page.locator(".msg.assistant").nth(2)
    assert "guard fired at token 2" in last.locator(".badge").inner_text()
    assert last.locator(".tok").count() == 3 and last.locator(".tok.fired").count() == 1
    assert page.locator("#map circle").count() >= 6 + 3  # the bank's emotions and 3 replies

    page.screenshot(path=tmp_path / "dashboard.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert not errors
    assert all(r.url.startswith(server) or r.url.startswith("data:") for r in requests)  # offline
    page.close()
