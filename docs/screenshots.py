"""Take the README's screenshots from the running app in headless Chromium: `python docs/screenshots.py`."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import browser_page, served_app  # noqa: E402


def main():
    with served_app() as base, browser_page(1400, 1100) as page:
        page.goto(base, wait_until="domcontentloaded")
        page.get_by_text("LD clean run").wait_for(timeout=180_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ROOT / "docs" / "home.png"))
        page.goto(f"{base}/Patching?patching.positions=each", wait_until="domcontentloaded")
        page.locator(".vega-embed").first.wait_for(timeout=180_000)
        page.wait_for_timeout(2500)
        page.locator(".vega-embed").first.screenshot(path=str(ROOT / "docs" / "patching.png"))
        page.goto(f"{base}/Ablation?ablation.targets=L1%20attn", wait_until="domcontentloaded")
        page.locator(".vega-embed").first.wait_for(timeout=180_000)
        page.wait_for_timeout(2500)
        page.locator(".vega-embed").first.screenshot(path=str(ROOT / "docs" / "ablation.png"))


if __name__ == "__main__":
    main()
