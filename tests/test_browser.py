"""End to end: the real server, a real headless Chromium, offline on the demo model."""
import os

import pytest

from tests.browser import browser_page, chromium_available, served_app

pytestmark = pytest.mark.skipif(not chromium_available() and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (CI installs it)")


def test_health_and_home_page_in_chromium(tmp_path):
    # No network: hub access is switched off, so only bundled files can be used.
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CIRCUIT_EXPLORER_CACHE": str(tmp_path)}
    with served_app(env) as base, browser_page() as page:
        page.goto(base, wait_until="domcontentloaded")
        page.get_by_text("LD clean run").wait_for(timeout=120_000)
        body = page.inner_text("body")
        assert "Traceback" not in body and "Error" not in body.split("Analyses")[0]
        assert "Mango" in page.locator("textarea").first.input_value()
        page.screenshot(path=str(tmp_path / "home.png"))
        os.makedirs("test-artifacts", exist_ok=True)
        page.screenshot(path="test-artifacts/home.png", full_page=True)
        page.goto(f"{base}/Patching?patching.positions=each", wait_until="domcontentloaded")
        page.locator(".vega-embed").first.wait_for(timeout=120_000)
        title = page.locator(".vega-embed").first.inner_html()
        assert "resid_post patched at each position" in title
        assert "Traceback" not in page.inner_text("body")
