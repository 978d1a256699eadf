"""Screenshots of stories in headless Chromium: the Story page playing a step, and an exported story
file opened from disk (no server, no network). `python docs/story_screenshots.py` (SmolLM2 prepared)."""
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import browser_page, served_app, settle  # noqa: E402

DOCS = ROOT / "docs"


def story_page(base: str, page, story: str, step: int, out: str) -> None:
    page.goto(f"{base}/Story?story.name={story}&story.step={step}", wait_until="domcontentloaded")
    page.locator(".vega-embed").first.wait_for(timeout=300_000)
    settle(page, timeout=300)
    page.wait_for_timeout(2000)
    page.screenshot(path=str(DOCS / out), full_page=True)


def exported_story(page, story: str, step: int, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "talk.html"
        subprocess.run([sys.executable, "-m", "explorer", "story", "export", story, "--out", str(html)], cwd=ROOT,
                       check=True)
        # Every request the page makes is recorded: an offline story makes none beyond its own file.
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"file://{html}#{step}")
        page.locator(f"#chart-{step} svg").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(DOCS / out))
        outside = [u for u in requests if not u.startswith("file://") and not u.startswith("data:")]
        assert not outside, outside


def main():
    with served_app() as base, browser_page(1600, 1000) as page:
        story_page(base, page, "ioi_smollm2.json", 3, "story_page.png")
    with browser_page(1600, 1000) as page:
        exported_story(page, "ioi_smollm2.json", 5, "story_export.png")


if __name__ == "__main__":
    main()
